/*
 * /sbin/uevent-helper of the hotplug-vmm test guest: the kernel runs it for every uevent
 * (/proc/sys/kernel/hotplug). It prints "BLOCK-ADD vda uptime=12.34" or "BLOCK-REMOVE vda ..."
 * on the console for whole-disk block devices and nothing for anything else. The line starts with
 * SOH (\001), the mark /init's forwarded kernel lines carry too: it may land inside a line a
 * shell command is still writing, and the mark lets the reader of the console take it out whole.
 *
 * It is freestanding (no libc, raw system calls) on purpose: on PVM hosts every page a new
 * process touches costs a trap to the host, and a hotplug produces a dozen uevents. A busybox
 * shell script per uevent took seconds each; this touches a handful of pages.
 *
 * Build: gcc -Os -static -nostdlib -fno-stack-protector -fno-pie -no-pie -o uevent-helper uevent-helper.c
 */
typedef unsigned long u64;

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_exit 60
#define O_RDONLY 0
#define O_WRONLY 1

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static int equal(const char *a, const char *b)
{
	return prefix(a, b) && prefix(b, a);
}

/* The value of `key` ("NAME=") in the environment, or 0. */
static const char *env_value(char **envp, const char *key)
{
	const char *k;
	for (; *envp; envp++)
		if (prefix(*envp, key)) {
			for (k = key; *k; k++)
				;
			return *envp + (k - key);
		}
	return 0;
}

static char *append(char *d, const char *s, char stop)
{
	while (*s && *s != stop)
		*d++ = *s++;
	return d;
}

void helper_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + argc + 2);
	const char *subsystem = env_value(envp, "SUBSYSTEM=");
	const char *devtype = env_value(envp, "DEVTYPE=");
	const char *action = env_value(envp, "ACTION=");
	const char *devname = env_value(envp, "DEVNAME=");
	char line[160], up[64];
	char *p = line;
	long fd, n;

	if (!subsystem || !devtype || !action || !devname)
		sys3(SYS_exit, 0, 0, 0);
	if (!equal(subsystem, "block") || !equal(devtype, "disk"))
		sys3(SYS_exit, 0, 0, 0);
	*p++ = '\001';
	if (equal(action, "add"))
		p = append(p, "BLOCK-ADD ", 0);
	else if (equal(action, "remove"))
		p = append(p, "BLOCK-REMOVE ", 0);
	else
		sys3(SYS_exit, 0, 0, 0);
	p = append(p, devname, 0);
	p = append(p, " uptime=", 0);
	fd = sys3(SYS_open, (long)"/proc/uptime", O_RDONLY, 0);
	n = fd >= 0 ? sys3(SYS_read, fd, (long)up, sizeof(up) - 1) : 0;
	up[n > 0 ? n : 0] = 0;
	p = append(p, up, ' ');
	*p++ = '\n';
	fd = sys3(SYS_open, (long)"/dev/console", O_WRONLY, 0);
	if (fd >= 0)
		sys3(SYS_write, fd, (long)line, p - line);
	sys3(SYS_exit, 0, 0, 0);
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall helper_main\n\thlt\n");
