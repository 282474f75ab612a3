/* csignal [--restart] HOST PORT
 *
 * A blocking connect() that a signal interrupts, as a program with a SIGALRM handler sees it:
 * the handler is installed with or without SA_RESTART, the alarm fires after 300 ms, and the
 * socket has TCP_SYNCNT=1 so a connect to a black hole gives up (ETIMEDOUT) after ~3 s in a pod.
 * Prints one line per step: "connect <ERRNO>" (after the alarm: EINTR, or, restarted, the final
 * outcome), "handler <ran|not run>", and without --restart, the socket made non-blocking,
 * "again <ERRNO>" for a second connect() (EALREADY while it goes on) and "outcome <ERRNO>"
 * (poll, then SO_ERROR).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "errname.h"
#include "netutil.h"

static volatile sig_atomic_t ran = 0;

static void on_alarm(int sig)
{
    (void)sig;
    ran = 1;
}

int main(int argc, char **argv)
{
    int restart = argc > 1 && strcmp(argv[1], "--restart") == 0;
    if (argc != 3 + restart) {
        fprintf(stderr, "usage: csignal [--restart] HOST PORT\n");
        return 2;
    }
    struct sockaddr_storage dst;
    socklen_t len = parse_addr(argv[1 + restart], argv[2 + restart], &dst);
    if (!len) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigaction(SIGALRM, &sa, NULL);
    int fd = socket(dst.ss_family, SOCK_STREAM, 0);
    int syncnt = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_SYNCNT, &syncnt, sizeof syncnt);
    struct itimerval at = {.it_value = {.tv_sec = 0, .tv_usec = 300000}};
    setitimer(ITIMER_REAL, &at, NULL);
    int rc = connect(fd, (struct sockaddr *)&dst, len);
    printf("connect %s\n", errname(rc == 0 ? 0 : errno));
    printf("handler %s\n", ran ? "ran" : "not run");
    fflush(stdout);
    if (restart)
        return 0;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    rc = connect(fd, (struct sockaddr *)&dst, len);
    printf("again %s\n", errname(rc == 0 ? 0 : errno));
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    poll(&pfd, 1, 60000);
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    printf("outcome %s\n", errname(soerr));
    return 0;
}
