/* ckeepalive HOST PORT [IDLE INTVL CNT]
 *
 * Connects (blocking); with IDLE INTVL CNT, then turns keepalive on with those (seconds, seconds,
 * probes) as Go does for every connection: setsockopt right after connect() returned, before
 * the first write. Sends "hello\n", waits for the server's line back, prints "ready", and then
 * waits in read() on the idle connection. When that read ends it prints
 *   read: <ERRNO_NAME>     or     read: EOF
 * A peer that vanished without a word (its packets dropped) is noticed only by keepalive: the
 * kernel gives up after IDLE + INTVL * CNT seconds without an answer (ETIMEDOUT).
 * Errors before "ready": "error <WHAT> <ERRNO_NAME>", exit 1.
 */
#include <netinet/tcp.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

static int fail(const char *what, int e)
{
    printf("error %s %s\n", what, errname(e));
    return 1;
}

static int set_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value);
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 6) {
        fprintf(stderr, "usage: ckeepalive HOST PORT [IDLE INTVL CNT]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sockaddr_storage dst;
    socklen_t len = parse_addr(argv[1], argv[2], &dst);
    if (!len) {
        fprintf(stderr, "ckeepalive: bad address %s\n", argv[1]);
        return 2;
    }
    int fd = socket(dst.ss_family, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket", errno);
    if (connect(fd, (struct sockaddr *)&dst, len) < 0)
        return fail("connect", errno);
    if (argc == 6) {
        if (set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1) < 0 || set_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, atoi(argv[3])) < 0 ||
            set_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, atoi(argv[4])) < 0 ||
            set_int(fd, IPPROTO_TCP, TCP_KEEPCNT, atoi(argv[5])) < 0)
            return fail("setsockopt", errno);
    }
    if (write(fd, "hello\n", 6) != 6)
        return fail("write", errno);
    char buf[256];
    size_t got = 0;
    while (got == 0 || buf[got - 1] != '\n') {
        ssize_t n = read(fd, buf + got, sizeof buf - got);
        if (n <= 0)
            return fail("read-line", n == 0 ? EPIPE : errno);
        got += (size_t)n;
        if (got == sizeof buf)
            return fail("read-line", EMSGSIZE);
    }
    printf("ready\n");
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n > 0)
            continue;
        if (n == 0) {
            printf("read: EOF\n");
            return 0;
        }
        if (errno == EINTR)
            continue;
        printf("read: %s\n", errname(errno));
        return 0;
    }
}
