/*
 * /sbin/hostile of the hotplug-vmm test guest: a guest that misbehaves on purpose (issue 21).
 *
 *   hostile SECONDS SEED
 *
 * For SECONDS it reads and writes random values of random sizes at random offsets into
 *   - every PCI function's configuration space (/sys/bus/pci/devices/ * /config),
 *   - every BAR of every function (resourceN: memory BARs mapped and accessed 1, 2, 4 or 8
 *     bytes wide, aligned or not; I/O BARs through read/write of the file),
 *   - the VMM's I/O ports: the configuration mechanism (0xCF8-0xCFF), the _OSC report block
 *     (0x610-0x61F), the ACPI hot-plug controller (0x620-0x637), and any other port but the
 *     few below. Where the kernel lets this process use IN/OUT itself (iopl), ports are accessed
 *     1, 2 or 4 bytes wide; otherwise byte by byte through /dev/port.
 * and prints one line: "HOSTILE seed=S config=W/R bar=W/R port=W/R mode=iopl|devport|none".
 *
 * Ports left alone, because writing them ends or blinds the test rather than the VMM: the
 * console UART (0x3F8-0x3FF, the harness reads the guest through it), the power registers
 * (0x600-0x602: S5 powers the guest off, the reset register reboots it), and the legacy ports
 * KVM itself decodes or the guest needs to keep time and interrupts (PIC, PIT, keyboard
 * controller and port 0x92 with their reset lines, CMOS, ELCR). The test's subject is the VMM;
 * the registers above are everything of the VMM's that a guest can reach by port.
 *
 * The guest may well break itself (a root port's bus numbers rewritten, a disk's queue moved):
 * that is its right. The VMM must go on, unchanged but for what the guest legitimately asked
 * for (a slot powered off, a device ejected).
 *
 * Freestanding like uevent-helper.c (every page a new process touches costs a trap to the host
 * on PVM hosts). It refuses to run outside the test guest (its /init's uevent helper is how it
 * knows): on a host, as root, it would write into real hardware. Build: gcc -Os -static -nostdlib -fno-stack-protector -fno-pie -no-pie
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return r;
}
#define sys3(n, a, b, c) sys6(n, a, b, c, 0, 0, 0)

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_fstat 5
#define SYS_mmap 9
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_fork 57
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_iopl 172
#define SYS_getdents64 217
#define SYS_clock_gettime 228
#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECTORY 0200000
#define PROT_RW 3
#define MAP_SHARED 1
#define CLOCK_MONOTONIC 1

#define MAX_CONFIGS 64
#define MAX_BARS 256

struct config {
	int fd;
	u32 size;
};
struct bar {
	volatile u8 *map; /* a memory BAR, mapped */
	int fd;           /* an I/O BAR: read and written through the file */
	u64 size;
};

static struct config configs[MAX_CONFIGS];
static struct bar bars[MAX_BARS];
static int nconfigs, nbars;
static u64 rng;
static u64 counts[6]; /* config w/r, bar w/r, port w/r */

static u64 next(void)
{
	/* xorshift64*: reproducible from the seed. */
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545f4914f6cdd1dUL;
}

static char *append(char *d, const char *s)
{
	while (*s)
		*d++ = *s++;
	*d = 0;
	return d;
}

static char *append_number(char *d, u64 v)
{
	char tmp[24];
	int n = 0;
	do
		tmp[n++] = '0' + v % 10;
	while (v /= 10);
	while (n)
		*d++ = tmp[--n];
	*d = 0;
	return d;
}

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static long number(const char *s)
{
	long v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (1L << 50))
			return -1;
		v = v * 10 + (*s - '0');
	}
	return v;
}

/* The size of the file `fd`, from fstat (the resource files' llseek does not give it on every
 * kernel); -1 on failure. */
static long file_size(long fd)
{
	long st[18]; /* struct stat is 144 bytes on x86_64; st_size at offset 48 */
	if (sys3(SYS_fstat, fd, (long)st, 0) != 0)
		return -1;
	return st[6];
}

static long now_ms(void)
{
	long ts[2];
	sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)ts, 0);
	return ts[0] * 1000 + ts[1] / 1000000;
}

/* Opens one function's config and BARs. */
static void add_function(const char *name)
{
	char path[256], *end;
	long fd, size, map;
	int i;

	end = append(append(append(path, "/sys/bus/pci/devices/"), name), "/");
	append(end, "config");
	fd = sys3(SYS_open, (long)path, O_RDWR, 0);
	if (fd >= 0 && nconfigs < MAX_CONFIGS) {
		size = file_size(fd);
		if (size > 0) {
			configs[nconfigs].fd = fd;
			configs[nconfigs++].size = size;
		}
	}
	for (i = 0; i < 6 && nbars < MAX_BARS; i++) {
		append_number(append(end, "resource"), i);
		fd = sys3(SYS_open, (long)path, O_RDWR, 0);
		if (fd < 0)
			continue;
		size = file_size(fd);
		if (size <= 0) {
			sys3(SYS_close, fd, 0, 0);
			continue;
		}
		map = sys6(SYS_mmap, 0, size, PROT_RW, MAP_SHARED, fd, 0);
		bars[nbars].size = size;
		if (map < 0 && map > -4096) {
			bars[nbars].map = 0;
			bars[nbars++].fd = fd;
		} else {
			bars[nbars].map = (volatile u8 *)map;
			bars[nbars++].fd = -1;
			sys3(SYS_close, fd, 0, 0);
		}
	}
}

static void find_functions(void)
{
	char buf[4096];
	long fd = sys3(SYS_open, (long)"/sys/bus/pci/devices", O_RDONLY | O_DIRECTORY, 0);
	long n, off;
	if (fd < 0)
		return;
	while ((n = sys3(SYS_getdents64, fd, (long)buf, sizeof(buf))) > 0) {
		for (off = 0; off < n;) {
			/* struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, char name[] */
			u16 reclen = *(u16 *)(buf + off + 16);
			const char *name = buf + off + 19;
			if (name[0] != '.')
				add_function(name);
			off += reclen;
		}
	}
	sys3(SYS_close, fd, 0, 0);
}

/* Ports the guest must not touch for the test to see anything (see the comment at the top). */
static int forbidden(u32 port, u32 len)
{
	static const u16 ranges[][2] = {
		{0x20, 0x21},   {0x40, 0x43},   {0x60, 0x64},   {0x70, 0x71}, {0x92, 0x92},
		{0xa0, 0xa1},   {0x3f8, 0x3ff}, {0x4d0, 0x4d1}, {0x600, 0x602},
	};
	u32 i;
	for (i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++)
		if (port <= ranges[i][1] && port + len > ranges[i][0])
			return 1;
	return port + len > 0x10000;
}

static u32 pick_port(u32 len)
{
	for (;;) {
		u64 r = next();
		u32 port;
		switch (r % 4) {
		case 0:
			port = 0xcf8 + (r >> 8) % 8;
			break;
		case 1:
			port = 0x610 + (r >> 8) % 16;
			break;
		case 2:
			port = 0x620 + (r >> 8) % 24;
			break;
		default:
			port = (r >> 8) % 0x10000;
		}
		if (!forbidden(port, len))
			return port;
	}
}

static void port_access_iopl(u64 r)
{
	u32 len = 1u << (r % 3), port = pick_port(len), v = next();
	u16 p = port;
	if ((r >> 2) & 3) {
		counts[4]++;
		if (len == 1)
			__asm__ volatile("outb %b0, %w1" : : "a"(v), "Nd"(p));
		else if (len == 2)
			__asm__ volatile("outw %w0, %w1" : : "a"(v), "Nd"(p));
		else
			__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(p));
	} else {
		counts[5]++;
		if (len == 1)
			__asm__ volatile("inb %w1, %b0" : "=a"(v) : "Nd"(p));
		else if (len == 2)
			__asm__ volatile("inw %w1, %w0" : "=a"(v) : "Nd"(p));
		else
			__asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(p));
	}
}

static void port_access_devport(long fd, u64 r)
{
	u32 port = pick_port(1);
	u8 v = next();
	if ((r >> 2) & 3) {
		counts[4]++;
		sys6(SYS_pwrite64, fd, (long)&v, 1, port, 0, 0);
	} else {
		counts[5]++;
		sys6(SYS_pread64, fd, (long)&v, 1, port, 0, 0);
	}
}

static void config_access(u64 r)
{
	struct config *c = &configs[(r >> 8) % nconfigs];
	u64 v = next();
	u32 len = 1 + (r >> 4) % 8, off = (r >> 20) % c->size;
	if (r & 0x30000) {
		counts[0]++;
		sys6(SYS_pwrite64, c->fd, (long)&v, len, off, 0, 0);
	} else {
		counts[1]++;
		sys6(SYS_pread64, c->fd, (long)&v, len, off, 0, 0);
	}
}

static void bar_access(u64 r)
{
	struct bar *b = &bars[(r >> 8) % nbars];
	u64 v = next(), off;
	u32 len = 1u << ((r >> 4) % 4);
	int write = (r & 0x30000) != 0;
	if (b->size < 8)
		return;
	off = (r >> 20) % (b->size - 7);
	/* Three accesses in four aligned, the rest at any byte. */
	if ((r >> 18) & 3)
		off &= ~(u64)(len - 1);
	counts[write ? 2 : 3]++;
	if (!b->map) {
		if (len == 8)
			len = 4;
		if (write)
			sys6(SYS_pwrite64, b->fd, (long)&v, len, off, 0, 0);
		else
			sys6(SYS_pread64, b->fd, (long)&v, len, off, 0, 0);
		return;
	}
	switch (len) {
	case 1:
		if (write)
			*(volatile u8 *)(b->map + off) = v;
		else
			v = *(volatile u8 *)(b->map + off);
		break;
	case 2:
		if (write)
			*(volatile u16 *)(b->map + off) = v;
		else
			v = *(volatile u16 *)(b->map + off);
		break;
	case 4:
		if (write)
			*(volatile u32 *)(b->map + off) = v;
		else
			v = *(volatile u32 *)(b->map + off);
		break;
	default:
		if (write)
			*(volatile u64 *)(b->map + off) = v;
		else
			v = *(volatile u64 *)(b->map + off);
	}
}

/* Whether IN/OUT work in this process after iopl(3): tried in a child, which a #GP kills. */
static int iopl_works(void)
{
	int status = -1;
	long pid = sys3(SYS_fork, 0, 0, 0);
	if (pid == 0) {
		u8 v;
		if (sys3(SYS_iopl, 3, 0, 0) != 0)
			sys3(SYS_exit, 1, 0, 0);
		__asm__ volatile("inb %w1, %b0" : "=a"(v) : "Nd"((u16)0x80));
		sys3(SYS_exit, 0, 0, 0);
	}
	if (pid < 0 || sys6(SYS_wait4, pid, (long)&status, 0, 0, 0, 0) != pid)
		return 0;
	return status == 0 && sys3(SYS_iopl, 3, 0, 0) == 0;
}

void hostile_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	long seconds = -1, seed = -1, deadline, devport = -1, i, fd;
	int mode;
	char line[256], *p;

	if (argc == 3) {
		seconds = number(argv[1]);
		seed = number(argv[2]);
	}
	if (seconds < 0 || seed < 0)
		sys3(SYS_exit, 1, 0, 0);
	/* Only in the test guest, whose /init makes the uevent helper the kernel's hotplug
	 * program: run anywhere else (a developer's host, as root), this would write at random
	 * into real hardware. */
	fd = sys3(SYS_open, (long)"/proc/sys/kernel/hotplug", O_RDONLY, 0);
	if (fd < 0 || sys3(SYS_read, fd, (long)line, sizeof(line)) != 20 ||
	    !prefix(line, "/sbin/uevent-helper\n")) {
		sys3(SYS_write, 2, (long)"hostile: not the hotplug-vmm test guest\n", 40);
		sys3(SYS_exit, 1, 0, 0);
	}
	sys3(SYS_close, fd, 0, 0);
	rng = seed * 2 + 1;
	find_functions();
	mode = iopl_works() ? 2 : 0;
	if (!mode) {
		devport = sys3(SYS_open, (long)"/dev/port", O_RDWR, 0);
		mode = devport >= 0 ? 1 : 0;
	}
	deadline = now_ms() + seconds * 1000;
	for (i = 0;; i++) {
		u64 r = next();
		if ((i & 63) == 0 && now_ms() >= deadline)
			break;
		switch (r % 3) {
		case 0:
			if (nconfigs)
				config_access(r >> 2);
			break;
		case 1:
			if (nbars)
				bar_access(r >> 2);
			break;
		default:
			if (mode == 2)
				port_access_iopl(r >> 2);
			else if (mode == 1)
				port_access_devport(devport, r >> 2);
		}
	}
	p = append_number(append(line, "HOSTILE seed="), seed);
	p = append_number(append(p, " functions="), nconfigs);
	p = append_number(append(p, " bars="), nbars);
	p = append_number(append(p, " config="), counts[0]);
	p = append_number(append(p, "/"), counts[1]);
	p = append_number(append(p, " bar="), counts[2]);
	p = append_number(append(p, "/"), counts[3]);
	p = append_number(append(p, " port="), counts[4]);
	p = append_number(append(p, "/"), counts[5]);
	p = append(append(p, " mode="), mode == 2 ? "iopl" : mode == 1 ? "devport" : "none");
	p = append(p, "\n");
	sys3(SYS_write, 1, (long)line, p - line);
	sys3(SYS_exit, 0, 0, 0);
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall hostile_main\n\thlt\n");
