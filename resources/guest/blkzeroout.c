/*
 * /sbin/blkzeroout of the hotplug-vmm test guest: "blkzeroout DEVICE OFFSET LENGTH" (bytes,
 * decimal, multiples of 512) zeroes that range of a block device with the BLKZEROOUT ioctl, which
 * the block layer turns into WRITE_ZEROES requests when the device offers them (virtio-blk's
 * VIRTIO_BLK_F_WRITE_ZEROES). Busybox has no applet for it. Exit status 0 on success, 1 on a
 * usage error, 2 when open or the ioctl fails.
 *
 * Freestanding like uevent-helper.c, for the same reason: every page a new process touches costs
 * a trap to the host on PVM hosts.
 *
 * Build: gcc -Os -static -nostdlib -fno-stack-protector -fno-pie -no-pie -o blkzeroout blkzeroout.c
 */
typedef unsigned long u64;

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

#define SYS_open 2
#define SYS_ioctl 16
#define SYS_exit 60
#define O_WRONLY 1
/* include/uapi/linux/fs.h: _IO(0x12, 127), argument u64[2] = { start, length } in bytes. */
#define BLKZEROOUT 0x127f

/* A decimal number, or -1 if `s` is not one. */
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

void zeroout_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	u64 range[2];
	long fd, start, len;

	if (argc != 4)
		sys3(SYS_exit, 1, 0, 0);
	start = number(argv[2]);
	len = number(argv[3]);
	if (start < 0 || len < 0)
		sys3(SYS_exit, 1, 0, 0);
	fd = sys3(SYS_open, (long)argv[1], O_WRONLY, 0);
	if (fd < 0)
		sys3(SYS_exit, 2, 0, 0);
	range[0] = start;
	range[1] = len;
	sys3(SYS_exit, sys3(SYS_ioctl, fd, BLKZEROOUT, (long)range) < 0 ? 2 : 0, 0, 0);
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall zeroout_main\n\thlt\n");
