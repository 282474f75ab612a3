/* Small helpers shared by the C fixture programs: parse and format socket addresses. */
#ifndef KTRACE_NETUTIL_H
#define KTRACE_NETUTIL_H
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Numeric HOST (IPv4 or IPv6) and PORT into ss; returns the address length or 0. */
static inline socklen_t parse_addr(const char *host, const char *port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    int p = atoi(port);
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)p);
        return sizeof *in4;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)p);
        return sizeof *in6;
    }
    return 0;
}

/* "ip:port" (IPv6 without brackets, like the hello server prints it). */
static inline const char *fmt_addr(const struct sockaddr_storage *ss, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in4->sin_addr, host, sizeof host);
        port = ntohs(in4->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    } else {
        snprintf(host, sizeof host, "family%d", ss->ss_family);
    }
    snprintf(out, n, "%s:%u", host, port);
    return out;
}
#endif
