/* cnetbench MODE ...: the benchmark's network client, built dynamically linked so that
 * LD_PRELOAD tools (proxychains-ng) can run it too. Talks to tests/programs/cbenchsrv.c.
 *
 *   latency HOST PORT N         N times: connect, send 'e', read the first byte back, close.
 *                               Prints "lat_ns <t1> ... <tN>" (connect() call → first byte).
 *   up HOST PORT BYTES          send BYTES, read the server's count of them.
 *   down HOST PORT BYTES        ask for BYTES and read them until EOF.
 *                               Both print "bytes <BYTES> elapsed_ns <connect() call → done>".
 *   concurrent HOST PORT C BYTES [--hold]
 *                               open C connections at once (non-blocking), then push BYTES of
 *                               echo through every one of them together and read them back.
 *                               Prints "ok <K> of <C> elapsed_ns <T>"; with --hold it then
 *                               waits for EOF on stdin (so the caller can sample memory use).
 *   split HOST PORT N           one connection with TCP_NODELAY (as Go's and curl's have), N times: a
 *                               2-byte request written as two 1-byte writes 1 ms apart, and the
 *                               server's 2-byte answer, which it writes 1 ms apart too ('p').
 *                               Prints "lat_ns ..." (the second write → the whole answer, the
 *                               server's pause included).
 *   dns NAME N                  N getaddrinfo(NAME) calls; prints "lat_ns <t1> ... <tN>".
 * A failure prints "error <ERRNO> <what>" and exits 1.
 */
#include <fcntl.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

#define CHUNK (256 * 1024)

static struct sockaddr_storage dst;
static socklen_t dstlen;
static unsigned char buf[CHUNK];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what)
{
    printf("error %s %s\n", errname(errno), what);
    return 1;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int dial(void)
{
    int fd = socket(dst.ss_family, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&dst, dstlen) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* The samples line scripts/bench reads: "lat_ns <t1> ... <tN>". */
static void print_samples(const uint64_t *samples, long n)
{
    printf("lat_ns");
    for (long i = 0; i < n; i++)
        printf(" %llu", (unsigned long long)samples[i]);
    printf("\n");
}

static int latency(long n)
{
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    if (!samples)
        return fail("calloc");
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        int fd = dial();
        if (fd < 0)
            return fail("connect");
        unsigned char c = 'e';
        if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1 || c != 'e')
            return fail("first byte");
        samples[i] = now_ns() - t0;
        shutdown(fd, SHUT_WR);
        while (read(fd, buf, sizeof buf) > 0)
            ;
        close(fd);
    }
    print_samples(samples, n);
    return 0;
}

static int split(long n)
{
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    if (!samples)
        return fail("calloc");
    int fd = dial();
    if (fd < 0)
        return fail("connect");
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    unsigned char c = 'p';
    if (write(fd, &c, 1) != 1)
        return fail("mode");
    const struct timespec pause = {0, 1000 * 1000};
    for (long i = 0; i < n; i++) {
        unsigned char answer[2];
        if (write(fd, &c, 1) != 1)
            return fail("first write");
        nanosleep(&pause, NULL);
        uint64_t t0 = now_ns();
        if (write(fd, &c, 1) != 1)
            return fail("second write");
        size_t got = 0;
        while (got < sizeof answer) {
            ssize_t r = read(fd, answer + got, sizeof answer - got);
            if (r <= 0)
                return fail("answer");
            got += (size_t)r;
        }
        samples[i] = now_ns() - t0;
    }
    close(fd);
    print_samples(samples, n);
    return 0;
}

static int bulk(int up, uint64_t bytes)
{
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)(i * 13 + 1);
    uint64_t t0 = now_ns();
    int fd = dial();
    if (fd < 0)
        return fail("connect");
    uint64_t got = 0;
    if (up) {
        unsigned char cmd[9] = {'u'};
        memcpy(cmd + 1, &bytes, sizeof bytes);
        if (write_all(fd, cmd, sizeof cmd) < 0)
            return fail("write");
        for (uint64_t left = bytes; left;) {
            size_t n = left < CHUNK ? (size_t)left : CHUNK;
            if (write_all(fd, buf, n) < 0)
                return fail("write");
            left -= n;
        }
        unsigned char reply[8];
        size_t have = 0;
        ssize_t r;
        while (have < sizeof reply && (r = read(fd, reply + have, sizeof reply - have)) > 0)
            have += (size_t)r;
        if (have != sizeof reply)
            return fail("reply");
        memcpy(&got, reply, sizeof got);
    } else {
        unsigned char cmd[9] = {'d'};
        memcpy(cmd + 1, &bytes, sizeof bytes);
        if (write_all(fd, cmd, sizeof cmd) < 0)
            return fail("write");
        ssize_t r;
        while ((r = read(fd, buf, sizeof buf)) > 0)
            got += (uint64_t)r;
        if (r < 0)
            return fail("read");
    }
    uint64_t t1 = now_ns();
    close(fd);
    if (got != bytes) {
        printf("error EIO short transfer %llu of %llu\n", (unsigned long long)got, (unsigned long long)bytes);
        return 1;
    }
    printf("bytes %llu elapsed_ns %llu\n", (unsigned long long)bytes, (unsigned long long)(t1 - t0));
    return 0;
}

struct conn {
    int fd;
    int connected;
    uint64_t sent, received; /* bytes of the payload, the leading 'e' included */
    int done;
};

static int concurrent(long c, uint64_t bytes, int hold)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(buf, 'x', sizeof buf);
    buf[0] = 'e';
    uint64_t total = bytes + 1;
    struct conn *conns = calloc((size_t)c, sizeof *conns);
    int ep = epoll_create1(0);
    if (!conns || ep < 0)
        return fail("setup");
    uint64_t t0 = now_ns();
    for (long i = 0; i < c; i++) {
        int fd = socket(dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (fd < 0)
            return fail("socket");
        if (connect(fd, (struct sockaddr *)&dst, dstlen) < 0 && errno != EINPROGRESS)
            return fail("connect");
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            return fail("epoll_ctl");
    }
    /* Every connection is established before any data flows: all C are open together. */
    long connected = 0;
    struct epoll_event events[256];
    while (connected < c) {
        int n = epoll_wait(ep, events, 256, 30000);
        if (n <= 0)
            return fail("connect wait");
        for (int k = 0; k < n; k++) {
            struct conn *cn = &conns[events[k].data.u64];
            if (cn->connected)
                continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(cn->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                errno = err;
                return fail("connect");
            }
            cn->connected = 1;
            connected++;
            struct epoll_event ev = {.events = 0, .data.u64 = events[k].data.u64};
            epoll_ctl(ep, EPOLL_CTL_MOD, cn->fd, &ev);
        }
    }
    for (long i = 0; i < c; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, conns[i].fd, &ev);
    }
    long finished = 0, ok = 0;
    static unsigned char sink[65536];
    while (finished < c) {
        int n = epoll_wait(ep, events, 256, 30000);
        if (n <= 0)
            break;
        for (int k = 0; k < n; k++) {
            struct conn *cn = &conns[events[k].data.u64];
            if (cn->done)
                continue;
            if ((events[k].events & EPOLLOUT) && cn->sent < total) {
                uint64_t left = total - cn->sent;
                size_t want = left < CHUNK - 1 ? (size_t)left : CHUNK - 1;
                /* buf is 'e' then 'x'...: the first write starts with the echo command. */
                ssize_t w = write(cn->fd, cn->sent ? buf + 1 : buf, want);
                if (w > 0) {
                    cn->sent += (uint64_t)w;
                } else if (errno != EAGAIN) {
                    cn->done = 1;
                    finished++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, cn->fd, NULL);
                    close(cn->fd);
                    continue;
                }
                if (cn->sent == total) {
                    shutdown(cn->fd, SHUT_WR);
                    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = events[k].data.u64};
                    epoll_ctl(ep, EPOLL_CTL_MOD, cn->fd, &ev);
                }
            }
            if (events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r;
                while ((r = read(cn->fd, sink, sizeof sink)) > 0)
                    cn->received += (uint64_t)r;
                if (r == 0 || (r < 0 && errno != EAGAIN)) {
                    cn->done = 1;
                    finished++;
                    if (r == 0 && cn->received == total)
                        ok++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, cn->fd, NULL);
                    close(cn->fd);
                }
            }
        }
    }
    uint64_t t1 = now_ns();
    printf("ok %ld of %ld elapsed_ns %llu\n", ok, c, (unsigned long long)(t1 - t0));
    fflush(stdout);
    if (hold)
        while (read(0, sink, sizeof sink) > 0)
            ;
    return ok == c ? 0 : 1;
}

static int dns(const char *name, long n)
{
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    if (!samples)
        return fail("calloc");
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    for (long i = 0; i < n; i++) {
        struct addrinfo *res = NULL;
        uint64_t t0 = now_ns();
        int rc = getaddrinfo(name, NULL, &hints, &res);
        samples[i] = now_ns() - t0;
        if (rc != 0) {
            printf("error EAI %s\n", gai_strerror(rc));
            return 1;
        }
        freeaddrinfo(res);
    }
    print_samples(samples, n);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && strcmp(argv[1], "dns") == 0)
        return dns(argv[2], strtol(argv[3], NULL, 10));
    if (argc < 5) {
        fprintf(stderr, "usage: cnetbench latency|split|up|down|concurrent|dns ...\n");
        return 2;
    }
    dstlen = parse_addr(argv[2], argv[3], &dst);
    if (!dstlen) {
        fprintf(stderr, "cnetbench: bad address\n");
        return 2;
    }
    const char *mode = argv[1];
    if (strcmp(mode, "latency") == 0)
        return latency(strtol(argv[4], NULL, 10));
    if (strcmp(mode, "split") == 0)
        return split(strtol(argv[4], NULL, 10));
    if (strcmp(mode, "up") == 0 || strcmp(mode, "down") == 0)
        return bulk(mode[0] == 'u', strtoull(argv[4], NULL, 10));
    if (strcmp(mode, "concurrent") == 0 && argc >= 6)
        return concurrent(strtol(argv[4], NULL, 10), strtoull(argv[5], NULL, 10),
                          argc == 7 && strcmp(argv[6], "--hold") == 0);
    fprintf(stderr, "cnetbench: bad arguments\n");
    return 2;
}
