/* crace MODE TRIES LOCAL_HOST LOCAL_PORT REMOTE_HOST REMOTE_PORT
 *
 * One thread flips an IPv4 sockaddr between LOCAL and REMOTE as fast as it can while the main thread
 * uses it TRIES times: MODE connect (a new TCP socket each time, blocking connect), or sendto,
 * sendmsg, sendmmsg (one UDP socket). Prints "<ERRNO> <count>" per result seen. On a machine
 * with no route to REMOTE, a call that reached the kernel with REMOTE unseen by ktrace fails
 * with ENETUNREACH: the count of those is the count of calls that slipped past.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "errname.h"
#include "netutil.h"

static struct sockaddr_storage shared, local, remote;
static socklen_t addr_len;
static atomic_int stop;

/* A sockaddr_in keeps family, port and address in its first 8 bytes (the rest is zero in
 * both): one aligned 64-bit store flips the whole address, never a mix of the two. */
static void *flipper(void *arg)
{
    (void)arg;
    _Atomic uint64_t *head = (_Atomic uint64_t *)&shared;
    uint64_t a, b;
    memcpy(&a, &local, 8);
    memcpy(&b, &remote, 8);
    while (!atomic_load(&stop)) {
        atomic_store_explicit(head, a, memory_order_relaxed);
        atomic_store_explicit(head, b, memory_order_relaxed);
    }
    return NULL;
}

#define MAX_ERRNO 200
static int counts[MAX_ERRNO];

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: crace connect|sendto|sendmsg|sendmmsg TRIES LHOST LPORT RHOST RPORT\n");
        return 2;
    }
    const char *mode = argv[1];
    int tries = atoi(argv[2]);
    addr_len = parse_addr(argv[3], argv[4], &local);
    if (addr_len != sizeof(struct sockaddr_in) || parse_addr(argv[5], argv[6], &remote) != addr_len) {
        fprintf(stderr, "bad addresses (two IPv4 ones)\n");
        return 2;
    }
    memcpy(&shared, &local, sizeof shared);
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    int udp = strcmp(mode, "connect") == 0 ? -1 : socket(local.ss_family, SOCK_DGRAM, 0);
    char payload[] = "ping";
    for (int i = 0; i < tries; i++) {
        int rc;
        if (udp < 0) {
            int fd = socket(local.ss_family, SOCK_STREAM, 0);
            rc = connect(fd, (struct sockaddr *)&shared, addr_len);
            close(fd);
        } else if (strcmp(mode, "sendto") == 0) {
            rc = sendto(udp, payload, 4, MSG_DONTWAIT, (struct sockaddr *)&shared, addr_len);
        } else {
            struct iovec iov = {.iov_base = payload, .iov_len = 4};
            struct mmsghdr m;
            memset(&m, 0, sizeof m);
            m.msg_hdr.msg_name = &shared;
            m.msg_hdr.msg_namelen = addr_len;
            m.msg_hdr.msg_iov = &iov;
            m.msg_hdr.msg_iovlen = 1;
            if (strcmp(mode, "sendmsg") == 0)
                rc = sendmsg(udp, &m.msg_hdr, MSG_DONTWAIT);
            else
                rc = sendmmsg(udp, &m, 1, MSG_DONTWAIT) == 1 ? 0 : -1;
        }
        int e = rc < 0 ? errno : 0;
        counts[e < MAX_ERRNO ? e : 0]++;
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    for (int e = 0; e < MAX_ERRNO; e++)
        if (counts[e])
            printf("%s %d\n", errname(e), counts[e]);
    return 0;
}
