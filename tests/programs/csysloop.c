/* csysloop MODE N [PATH]
 *
 * A syscall-heavy program that makes no network calls, timing only its own loop (so the
 * tracer's start-up is not counted; scripts/bench measures that separately):
 *   getppid N      N getppid() calls
 *   rw N           N one-byte read(/dev/zero) + write(/dev/null) pairs, like `dd bs=1`
 *   open N PATH    N open(PATH) + close pairs (open is a syscall ktrace's filter stops)
 * Prints "elapsed_ns <nanoseconds> calls <N>" and exits 0.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: csysloop getppid|rw|open N [PATH]\n");
        return 2;
    }
    const char *mode = argv[1];
    long n = strtol(argv[2], NULL, 10);
    uint64_t t0, t1;
    if (strcmp(mode, "getppid") == 0) {
        t0 = now_ns();
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid); /* not the libc wrapper: no caching, always a syscall */
        t1 = now_ns();
    } else if (strcmp(mode, "rw") == 0) {
        int in = open("/dev/zero", O_RDONLY), out = open("/dev/null", O_WRONLY);
        if (in < 0 || out < 0) {
            perror("open");
            return 1;
        }
        char c;
        t0 = now_ns();
        for (long i = 0; i < n; i++) {
            if (read(in, &c, 1) != 1 || write(out, &c, 1) != 1) {
                perror("read/write");
                return 1;
            }
        }
        t1 = now_ns();
    } else if (strcmp(mode, "open") == 0 && argc == 4) {
        t0 = now_ns();
        for (long i = 0; i < n; i++) {
            int fd = open(argv[3], O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                perror("open");
                return 1;
            }
            close(fd);
        }
        t1 = now_ns();
    } else {
        fprintf(stderr, "csysloop: bad arguments\n");
        return 2;
    }
    printf("elapsed_ns %llu calls %ld\n", (unsigned long long)(t1 - t0), n);
    return 0;
}
