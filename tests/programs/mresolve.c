/* mresolve NAME PORT  (built with musl-gcc -static: musl's own resolver, no NSS, no libc hook)
 *
 * Resolves NAME with getaddrinfo, prints "addr <ip>" for each answer (AF_UNSPEC, TCP), then
 * connects to the first address, sends an HTTP/1.0 GET and prints the reply. Prints
 * "error resolve <gai message>" or "error <ERRNO_NAME>" and exits 1 on failure.
 */
#include <netdb.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: mresolve NAME PORT\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &res);
    if (rc != 0) {
        printf("error resolve %s\n", gai_strerror(rc));
        return 1;
    }
    char abuf[80];
    for (ai = res; ai; ai = ai->ai_next) {
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof ss);
        memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
        printf("addr %s\n", fmt_addr(&ss, abuf, sizeof abuf));
    }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
        printf("error %s\n", errname(errno));
        return 1;
    }
    static const char req[] = "GET / HTTP/1.0\r\nHost: mresolve\r\n\r\n";
    if (write(fd, req, sizeof req - 1) < 0) {
        printf("error %s\n", errname(errno));
        return 1;
    }
    char buf[4096];
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0)
        fwrite(buf, 1, (size_t)r, stdout);
    freeaddrinfo(res);
    close(fd);
    return 0;
}
