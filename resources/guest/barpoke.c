/*
 * barpoke of the hotplug-vmm test guest: writes chosen 32-bit values into a PCI function's memory
 * BAR, in steps a test can time.
 *
 *   barpoke RESOURCE STEP...
 *
 * RESOURCE is a memory BAR's sysfs file (/sys/bus/pci/devices/D/resourceN); it is mapped once,
 * and the mapping outlives what the guest's kernel later does with the function (a removal that
 * marks it disconnected, for instance). Each STEP, in order:
 *   OFFSET=VALUE  writes VALUE (32 bits, aligned) at OFFSET in the BAR (numbers in C notation:
 *                 0x hex or decimal),
 *   wait:PATH     waits until PATH exists (polling every 10 ms),
 * and prints "barpoke: STEP" once done, so the caller knows where it stands.
 *
 * tests/surprise.rs uses it to mask a virtio function's MSI-X vectors before pulling the disk out
 * and to unmask them once the guest's removal has begun: the answers then reach the guest only
 * after its removal started, which is the window of the guest's race that test pins.
 *
 * A test tool, carried on a test disk (common::build_guest_tool), not in the initramfs. Exit
 * status 0 when every step was done, 1 on a usage error (every step is checked first: then
 * nothing is written), 2 when the BAR cannot be mapped.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int number(const char *s, unsigned long *out)
{
	char *end;
	if (!*s)
		return -1;
	*out = strtoul(s, &end, 0);
	return *end ? -1 : 0;
}

/*
 * Parses STEP: 1 for "wait:PATH", 0 for "OFFSET=VALUE" (a 32-bit value at an aligned offset
 * inside a BAR of `size` bytes, into *offset and *value), -1 for anything else.
 */
static int step(const char *arg, long size, unsigned long *offset, unsigned long *value)
{
	char text[64];
	char *eq;

	if (strncmp(arg, "wait:", 5) == 0)
		return arg[5] ? 1 : -1;
	if (strlen(arg) >= sizeof(text))
		return -1;
	strcpy(text, arg);
	eq = strchr(text, '=');
	if (!eq)
		return -1;
	*eq = 0;
	if (number(text, offset) || number(eq + 1, value) || *offset % 4 || size < 4 ||
	    *offset > (unsigned long)size - 4 || *value > 0xffffffffUL)
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct stat st;
	volatile uint8_t *bar;
	int fd, i;

	if (argc < 3) {
		fprintf(stderr, "usage: barpoke RESOURCE (OFFSET=VALUE | wait:PATH)...\n");
		return 1;
	}
	fd = open(argv[1], O_RDWR | O_SYNC);
	if (fd < 0 || fstat(fd, &st) < 0 || st.st_size <= 0) {
		perror(argv[1]);
		return 2;
	}
	bar = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	/* Every step is checked before the first is done: a bad one changes nothing. */
	for (i = 2; i < argc; i++) {
		unsigned long offset, value;
		if (step(argv[i], st.st_size, &offset, &value) < 0) {
			fprintf(stderr, "barpoke: bad step %s\n", argv[i]);
			return 1;
		}
	}
	for (i = 2; i < argc; i++) {
		unsigned long offset, value;
		if (step(argv[i], st.st_size, &offset, &value)) {
			struct timespec tick = {0, 10 * 1000 * 1000};
			while (access(argv[i] + 5, F_OK) != 0)
				nanosleep(&tick, NULL);
		} else {
			*(volatile uint32_t *)(bar + offset) = (uint32_t)value;
		}
		printf("barpoke: %s\n", argv[i]);
		fflush(stdout);
	}
	return 0;
}
