/* cbenchsrv ADDR PORT
 *
 * The benchmark's TCP server (scripts/bench runs it in the cluster namespace), one thread per
 * connection so that it is never the bottleneck of what is measured. The first byte a client
 * sends chooses what happens:
 *   'e'           echo: that byte and everything after it come back, until the client half-closes
 *   'u' + u64 N   upload: read N bytes (or until EOF), then answer the byte count (u64) and close;
 *                 no half-close needed (SOCKS servers such as microsocks do not pass one on)
 *   'd' + u64 N   download: N bytes are sent, then the connection is closed
 *   'p'           pairs, with TCP_NODELAY (as a Go server has it): read a request of 2 bytes, answer
 *                 1 byte, 1 ms later another; again until EOF (scripts/bench's split_writes)
 * Integers are little-endian.
 * Prints "READY" once listening; runs until killed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "netutil.h"

#define BUF (256 * 1024)

static unsigned char source[BUF];

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_full(int fd, unsigned char *p, size_t n)
{
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void serve(int fd, unsigned char *buf, size_t cap)
{
    unsigned char cmd;
    if (read_full(fd, &cmd, 1) < 0)
        return;
    if (cmd == 'e') {
        if (write_all(fd, &cmd, 1) < 0)
            return;
        ssize_t r;
        while ((r = read(fd, buf, cap)) > 0)
            if (write_all(fd, buf, (size_t)r) < 0)
                return;
    } else if (cmd == 'u') {
        uint64_t want, total = 0;
        if (read_full(fd, (unsigned char *)&want, sizeof want) < 0)
            return;
        ssize_t r = 1;
        while (total < want && (r = read(fd, buf, want - total < cap ? (size_t)(want - total) : cap)) > 0)
            total += (uint64_t)r;
        if (r < 0)
            return;
        write_all(fd, (unsigned char *)&total, sizeof total);
    } else if (cmd == 'p') {
        int on = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        unsigned char request[2];
        const struct timespec pause = {0, 1000 * 1000};
        while (read_full(fd, request, sizeof request) == 0) {
            if (write_all(fd, request, 1) < 0)
                return;
            nanosleep(&pause, NULL);
            if (write_all(fd, request + 1, 1) < 0)
                return;
        }
    } else if (cmd == 'd') {
        uint64_t want;
        if (read_full(fd, (unsigned char *)&want, sizeof want) < 0)
            return;
        while (want) {
            size_t n = want < BUF ? (size_t)want : BUF;
            if (write_all(fd, source, n) < 0)
                return;
            want -= n;
        }
    }
}

static void *conn_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    /* malloc'd pages are only touched as used: 1,000 echo connections stay small. */
    size_t cap = BUF;
    unsigned char *buf = malloc(cap);
    if (buf)
        serve(fd, buf, cap);
    free(buf);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: cbenchsrv ADDR PORT\n");
        return 2;
    }
    for (size_t i = 0; i < BUF; i++)
        source[i] = (unsigned char)(i * 7 + 3);
    struct sockaddr_storage addr;
    socklen_t len = parse_addr(argv[1], argv[2], &addr);
    int ls = socket(addr.ss_family, SOCK_STREAM, 0);
    int one = 1;
    if (!len || ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(ls, (struct sockaddr *)&addr, len) < 0 || listen(ls, 4096) < 0) {
        perror("cbenchsrv: listen");
        return 1;
    }
    printf("READY\n");
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                continue;
            perror("cbenchsrv: accept");
            return 1;
        }
        pthread_t t;
        if (pthread_create(&t, &attr, conn_thread, (void *)(intptr_t)fd) != 0)
            close(fd);
    }
}
