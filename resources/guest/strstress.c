/*
 * strstress ROUNDS: calls glibc's string functions (the variants its ifunc resolvers pick for
 * this CPU) on known data and checks every result against the answer the test knows. Prints
 * "strstress: ok" and exits 0, or names the first wrong result and exits 1.
 *
 * Why: on PVM hosts the guest kernel must run with `noxsave` (KVM's emulator cannot run its
 * xrstor), so it saves and restores only the x87/SSE state of a task, while user space still
 * sees the host's CPUID and XCR0 and may use AVX, AVX2 and AVX-512 registers (ymm upper halves,
 * zmm16-31, k0-7). Two processes that use them at once then see each other's values after a
 * preemption: glibc picks its EVEX string functions on AVX-512 hosts, and busybox's `ls` printed
 * its format string and pipelines segfaulted. The VMM's default command line sets GLIBC_TUNABLES
 * so that glibc picks the SSE2 variants; run several of these at once to check that it holds.
 *
 * Built by the tests, not part of the initramfs: gcc -O2 -static -s -o strstress strstress.c
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char buf[8192];

static void fail(const char *what, long round)
{
	char msg[128], digits[24];
	int n = 0, k = 0;
	for (const char *p = "strstress: wrong result from "; *p; p++)
		msg[n++] = *p;
	for (; *what && n < 80; what++)
		msg[n++] = *what;
	for (const char *p = " in round "; *p; p++)
		msg[n++] = *p;
	do {
		digits[k++] = '0' + round % 10;
		round /= 10;
	} while (round);
	while (k)
		msg[n++] = digits[--k];
	msg[n++] = '\n';
	write(1, msg, n);
	_exit(1);
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000000;

	for (long r = 0; r < rounds; r++) {
		size_t len = 64 + (r * 37) % 4000, pct = (r * 13) % len;
		for (size_t i = 0; i < len; i++)
			buf[i] = 'a' + (i + r) % 26;
		buf[pct] = '%';
		buf[len] = 0;
		if (strlen(buf) != len)
			fail("strlen", r);
		if (strchrnul(buf, '%') != buf + pct)
			fail("strchrnul", r);
		if (strchr(buf, '%') != buf + pct)
			fail("strchr", r);
		if (memchr(buf, '%', len) != buf + pct)
			fail("memchr", r);
		if (strrchr(buf, '%') != buf + pct)
			fail("strrchr", r);
		memcpy(buf + 4096, buf, len + 1);
		if (memcmp(buf, buf + 4096, len) != 0)
			fail("memcpy or memcmp", r);
		if (strcmp(buf, buf + 4096) != 0)
			fail("strcmp", r);
		buf[4096 + len - 1]++;
		if (strcmp(buf, buf + 4096) >= 0)
			fail("strcmp (less)", r);
	}
	write(1, "strstress: ok\n", 14);
	return 0;
}
