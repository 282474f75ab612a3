/* cconnect [--nonblock] [--send TEXT] HOST PORT
 *
 * Connects (blocking, or non-blocking + poll + getsockopt(SO_ERROR)), then prints
 *   ok <getpeername> <getsockname>
 * or
 *   error <ERRNO_NAME>        (exit 1)
 * On success it sends TEXT (default: an HTTP/1.0 GET), half-closes, and prints everything
 * the server answers until EOF after a line "reply:".
 */
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

static int fail(int e)
{
    printf("error %s\n", errname(e));
    return 1;
}

int main(int argc, char **argv)
{
    int nonblock = 0;
    const char *text = "GET / HTTP/1.0\r\nHost: cconnect\r\n\r\n";
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--nonblock") == 0)
            nonblock = 1;
        else if (strcmp(argv[i], "--send") == 0 && i + 1 < argc)
            text = argv[++i];
        else
            break;
    }
    if (argc - i != 2) {
        fprintf(stderr, "usage: cconnect [--nonblock] [--send TEXT] HOST PORT\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sockaddr_storage dst;
    socklen_t len = parse_addr(argv[i], argv[i + 1], &dst);
    if (!len) {
        fprintf(stderr, "cconnect: bad address %s\n", argv[i]);
        return 2;
    }
    int fd = socket(dst.ss_family, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return fail(errno);
    if (connect(fd, (struct sockaddr *)&dst, len) < 0) {
        if (!nonblock || errno != EINPROGRESS)
            return fail(errno);
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int n = poll(&pfd, 1, 60000);
        if (n < 0)
            return fail(errno);
        if (n == 0) {
            printf("error POLL_TIMEOUT\n");
            return 1;
        }
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
            return fail(errno);
        if (soerr)
            return fail(soerr);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    }
    struct sockaddr_storage peer, self;
    socklen_t pl = sizeof peer, sl = sizeof self;
    char pbuf[80], sbuf[80];
    if (getpeername(fd, (struct sockaddr *)&peer, &pl) < 0)
        return fail(errno);
    if (getsockname(fd, (struct sockaddr *)&self, &sl) < 0)
        return fail(errno);
    printf("ok %s %s\n", fmt_addr(&peer, pbuf, sizeof pbuf), fmt_addr(&self, sbuf, sizeof sbuf));
    size_t want = strlen(text), done = 0;
    while (done < want) {
        ssize_t w = write(fd, text + done, want - done);
        if (w < 0)
            return fail(errno);
        done += (size_t)w;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return fail(errno);
    printf("reply:\n");
    char buf[4096];
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0)
        fwrite(buf, 1, (size_t)r, stdout);
    if (r < 0)
        return fail(errno);
    close(fd);
    return 0;
}
