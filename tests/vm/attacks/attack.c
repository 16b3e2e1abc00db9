// SPDX-License-Identifier: GPL-2.0
/*
 * Freestanding (no libc) x86_64 helper for the enforcement tests: each subcommand tries
 * one way of getting code executed and exits with 0 if the kernel allowed it, else the
 * errno of the refused step.  Built twice in the guest:
 *   static:  gcc -static -no-pie -nostdlib ... (runs with nothing else executable)
 *   pie:     gcc -fPIE -pie -nostdlib ...      (has ld.so as interpreter; for `ld.so ./x`)
 *
 *   attack true                      exit 0 (a program to run)
 *   attack exec PATH [ARGS...]       execve(PATH)
 *   attack mmap-exec PATH            mmap(PROT_READ|PROT_EXEC) of a file
 *   attack mprotect PATH             mmap(PROT_READ) then mprotect(+PROT_EXEC)
 *   attack anon-exec                 mmap(MAP_ANONYMOUS, PROT_EXEC)
 *   attack anon-mprotect             anonymous RW mapping, then mprotect(+PROT_EXEC)
 *   attack memfd-exec PATH ARGV0 [ARGS...]  copy PATH into a memfd, execveat(AT_EMPTY_PATH)
 *   attack finit PATH FLAGS          finit_module(open(PATH), "", FLAGS)
 *   attack init PATH                 init_module(contents of PATH, "")
 *   attack delmod NAME               delete_module(NAME, O_NONBLOCK)
 *   attack bench-exec PATH N         fork+execve(PATH true)+wait N times; prints total ns
 *   attack bench-mmap PATH N         mmap(PROT_READ|PROT_EXEC)+munmap N times; prints total ns
 *   attack bench-open PATH N         open+read(4096)+close N times; prints total ns
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_fstat 5
#define SYS_lseek 8
#define SYS_mmap 9
#define SYS_mprotect 10
#define SYS_munmap 11
#define SYS_fork 57
#define SYS_wait4 61
#define SYS_clock_gettime 228
#define SYS_execve 59
#define SYS_exit 60
#define SYS_init_module 175
#define SYS_delete_module 176
#define SYS_memfd_create 319
#define SYS_execveat 322
#define SYS_finit_module 313

#define PROT_READ 1
#define PROT_WRITE 2
#define PROT_EXEC 4
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20
#define AT_EMPTY_PATH 0x1000
#define O_NONBLOCK 04000

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

__asm__(".text\n.globl _start\n_start:\n"
	"  xor %rbp, %rbp\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call cmain\n"
	"  mov %eax, %edi\n"
	"  mov $60, %eax\n"
	"  syscall\n"
	"  hlt\n");

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

static long parse(const char *s)
{
	long v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0');
	return v;
}

static int err(long ret)
{
	return ret < 0 ? (int)-ret : 0;
}

static long file_size(int fd)
{
	long end = sys3(SYS_lseek, fd, 0, 2);

	sys3(SYS_lseek, fd, 0, 0);
	return end;
}

static long map_file(const char *path, int prot, long *size)
{
	long fd = sys3(SYS_open, path, 0, 0);
	long addr;

	if (fd < 0)
		return fd;
	*size = file_size(fd);
	addr = sys6(SYS_mmap, 0, *size ? *size : 4096, prot, MAP_PRIVATE, fd, 0);
	sys3(SYS_close, fd, 0, 0);
	return addr;
}

static long read_all(const char *path, char **buf, long *size)
{
	long fd = sys3(SYS_open, path, 0, 0);
	long got = 0, n;

	if (fd < 0)
		return fd;
	*size = file_size(fd);
	*buf = (char *)sys6(SYS_mmap, 0, *size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if ((long)*buf < 0 && (long)*buf > -4096)
		return (long)*buf;
	while (got < *size && (n = sys3(SYS_read, fd, *buf + got, *size - got)) > 0)
		got += n;
	sys3(SYS_close, fd, 0, 0);
	return 0;
}

static long now_ns(void)
{
	long ts[2];

	sys3(SYS_clock_gettime, 1, ts, 0);
	return ts[0] * 1000000000L + ts[1];
}

static void print_long(long v)
{
	char buf[24];
	int i = 23;

	buf[i--] = '\n';
	if (v == 0)
		buf[i--] = '0';
	while (v > 0 && i >= 0) {
		buf[i--] = '0' + v % 10;
		v /= 10;
	}
	sys3(SYS_write, 1, buf + i + 1, 23 - i);
}

static int bench_exec(char *path, long n, char **envp)
{
	char *args[3] = {path, "true", 0};
	long start = now_ns(), pid;
	int status, i;

	for (i = 0; i < n; i++) {
		pid = sys3(SYS_fork, 0, 0, 0);
		if (pid == 0) {
			sys3(SYS_execve, path, args, envp);
			sys3(SYS_exit, 127, 0, 0);
		}
		if (pid < 0)
			return 100;
		sys6(SYS_wait4, pid, (long)&status, 0, 0, 0, 0);
		if (status != 0)
			return 101;
	}
	print_long(now_ns() - start);
	return 0;
}

static int bench_mmap(const char *path, long n)
{
	long fd = sys3(SYS_open, path, 0, 0), start, addr;
	int i;

	if (fd < 0)
		return 100;
	start = now_ns();
	for (i = 0; i < n; i++) {
		addr = sys6(SYS_mmap, 0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
		if (addr < 0 && addr > -4096)
			return err(addr);
		sys3(SYS_munmap, addr, 4096, 0);
	}
	print_long(now_ns() - start);
	return 0;
}

static int bench_open(const char *path, long n)
{
	char buf[4096];
	long start = now_ns(), fd;
	int i;

	for (i = 0; i < n; i++) {
		fd = sys3(SYS_open, path, 0, 0);
		if (fd < 0)
			return err(fd);
		sys3(SYS_read, fd, buf, sizeof(buf));
		sys3(SYS_close, fd, 0, 0);
	}
	print_long(now_ns() - start);
	return 0;
}

int cmain(long *sp)
{
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	const char *cmd = argc > 1 ? argv[1] : "true";
	long ret, size = 0;
	char *buf = 0;

	if (streq(cmd, "true"))
		return 0;
	if (argc < 2)
		return 22;
	if (streq(cmd, "anon-exec"))
		return err(sys6(SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
	if (streq(cmd, "anon-mprotect")) {
		ret = sys6(SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (ret < 0 && ret > -4096)
			return 100;
		return err(sys3(SYS_mprotect, ret, 4096, PROT_READ | PROT_EXEC));
	}
	if (argc < 3)
		return 22;
	if (streq(cmd, "exec"))
		return err(sys3(SYS_execve, argv[2], argv + 2, envp));
	if (streq(cmd, "mmap-exec")) {
		ret = map_file(argv[2], PROT_READ | PROT_EXEC, &size);
		return ret < 0 && ret > -4096 ? err(ret) : 0;
	}
	if (streq(cmd, "mprotect")) {
		ret = map_file(argv[2], PROT_READ, &size);
		if (ret < 0 && ret > -4096)
			return 100;
		return err(sys3(SYS_mprotect, ret, size ? size : 4096, PROT_READ | PROT_EXEC));
	}
	if (streq(cmd, "memfd-exec")) {
		long fd, off = 0, n;

		if (read_all(argv[2], &buf, &size) < 0)
			return 100;
		fd = sys3(SYS_memfd_create, "payload", 0, 0);
		if (fd < 0)
			return 101;
		while (off < size && (n = sys3(SYS_write, fd, buf + off, size - off)) > 0)
			off += n;
		return err(sys6(SYS_execveat, fd, (long)"", (long)(argv + 3), (long)envp, AT_EMPTY_PATH, 0));
	}
	if (streq(cmd, "finit")) {
		long fd = sys3(SYS_open, argv[2], 0, 0);

		if (fd < 0)
			return 100;
		return err(sys3(SYS_finit_module, fd, "", argc > 3 ? parse(argv[3]) : 0));
	}
	if (streq(cmd, "init")) {
		if (read_all(argv[2], &buf, &size) < 0)
			return 100;
		return err(sys3(SYS_init_module, buf, size, ""));
	}
	if (streq(cmd, "bench-exec") && argc > 3)
		return bench_exec(argv[2], parse(argv[3]), envp);
	if (streq(cmd, "bench-mmap") && argc > 3)
		return bench_mmap(argv[2], parse(argv[3]));
	if (streq(cmd, "bench-open") && argc > 3)
		return bench_open(argv[2], parse(argv[3]));
	if (streq(cmd, "delmod"))
		return err(sys3(SYS_delete_module, argv[2], O_NONBLOCK, 0));
	return 22;
}
