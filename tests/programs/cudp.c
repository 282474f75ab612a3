/* cudp MODE HOST PORT [COUNT]
 *
 * UDP client for the cluster's UDP echo service. MODE:
 *   connected  connect() then send()/recv(); also prints getpeername
 *   sendto     unconnected sendto()/recvfrom()
 *   mmsg       unconnected sendmmsg() of COUNT datagrams (each with its own msg_name),
 *              then recvmmsg() until COUNT replies arrived
 *   cmmsg      connect() then sendmmsg()/recvmmsg() without addresses (glibc's resolver does this)
 * Every reply prints "reply <source address> <payload>" (source: from recvfrom/recvmmsg, or
 * getpeername for connected modes); "error <ERRNO_NAME>" and exit 1 on failure. Replies wait
 * at most 10 s (SO_RCVTIMEO).
 */
#define _GNU_SOURCE
#include <sys/time.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

#define MAXN 64

static int fail(const char *what)
{
    printf("error %s (%s)\n", errname(errno), what);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: cudp connected|sendto|mmsg|cmmsg HOST PORT [COUNT]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argv[1];
    int count = argc > 4 ? atoi(argv[4]) : 3;
    if (count < 1 || count > MAXN)
        count = 3;
    struct sockaddr_storage dst, src;
    socklen_t len = parse_addr(argv[2], argv[3], &dst), slen;
    if (!len) {
        fprintf(stderr, "cudp: bad address %s\n", argv[2]);
        return 2;
    }
    int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (fd < 0)
        return fail("socket");
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char abuf[80], buf[MAXN][128];
    int connected = strcmp(mode, "connected") == 0 || strcmp(mode, "cmmsg") == 0;
    if (connected) {
        if (connect(fd, (struct sockaddr *)&dst, len) < 0)
            return fail("connect");
        slen = sizeof src;
        if (getpeername(fd, (struct sockaddr *)&src, &slen) < 0)
            return fail("getpeername");
        printf("peer %s\n", fmt_addr(&src, abuf, sizeof abuf));
    }
    if (strcmp(mode, "connected") == 0 || strcmp(mode, "sendto") == 0) {
        static const char msg[] = "cudp single";
        ssize_t n = connected ? send(fd, msg, sizeof msg - 1, 0)
                              : sendto(fd, msg, sizeof msg - 1, 0, (struct sockaddr *)&dst, len);
        if (n < 0)
            return fail("send");
        slen = sizeof src;
        n = connected ? recv(fd, buf[0], sizeof buf[0] - 1, 0)
                      : recvfrom(fd, buf[0], sizeof buf[0] - 1, 0, (struct sockaddr *)&src, &slen);
        if (n < 0)
            return fail("recv");
        buf[0][n] = 0;
        printf("reply %s %s\n", fmt_addr(&src, abuf, sizeof abuf), buf[0]);
        return 0;
    }
    if (strcmp(mode, "mmsg") != 0 && strcmp(mode, "cmmsg") != 0) {
        fprintf(stderr, "cudp: unknown mode %s\n", mode);
        return 2;
    }
    struct mmsghdr msgs[MAXN];
    struct iovec iov[MAXN];
    struct sockaddr_storage from[MAXN];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < count; i++) {
        int n = snprintf(buf[i], sizeof buf[i], "cudp mmsg %d", i);
        iov[i] = (struct iovec){.iov_base = buf[i], .iov_len = (size_t)n};
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (!connected) {
            msgs[i].msg_hdr.msg_name = &dst;
            msgs[i].msg_hdr.msg_namelen = len;
        }
    }
    for (int sent = 0; sent < count;) {
        int n = sendmmsg(fd, msgs + sent, (unsigned)(count - sent), 0);
        if (n < 0)
            return fail("sendmmsg");
        sent += n;
    }
    for (int got = 0; got < count;) {
        for (int i = got; i < count; i++) {
            iov[i] = (struct iovec){.iov_base = buf[i], .iov_len = sizeof buf[i] - 1};
            msgs[i].msg_hdr.msg_name = connected ? NULL : &from[i];
            msgs[i].msg_hdr.msg_namelen = connected ? 0 : sizeof from[i];
        }
        int n = recvmmsg(fd, msgs + got, (unsigned)(count - got), MSG_WAITFORONE, NULL);
        if (n < 0)
            return fail("recvmmsg");
        for (int i = got; i < got + n; i++) {
            buf[i][msgs[i].msg_len] = 0;
            printf("reply %s %s\n", fmt_addr(connected ? &src : &from[i], abuf, sizeof abuf), buf[i]);
        }
        got += n;
    }
    return 0;
}
