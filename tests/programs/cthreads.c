/* cthreads HOST PORT [THREADS]
 *
 * THREADS (default 8) pthreads, released together by a barrier, each connect to HOST PORT,
 * send an HTTP/1.0 GET and read the reply until EOF. Prints one line per thread and
 * "all N ok" (exit 0) or "failed K of N" (exit 1).
 */
#include <pthread.h>
#include <unistd.h>
#include "errname.h"
#include "netutil.h"

#define MAXT 64

static struct sockaddr_storage dst;
static socklen_t dstlen;
static pthread_barrier_t barrier;

struct result {
    int err;
    char reply[256];
};

static void *worker(void *arg)
{
    struct result *res = arg;
    pthread_barrier_wait(&barrier);
    int fd = socket(dst.ss_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&dst, dstlen) < 0) {
        res->err = errno;
        return NULL;
    }
    static const char req[] = "GET / HTTP/1.0\r\nHost: cthreads\r\n\r\n";
    if (write(fd, req, sizeof req - 1) != (ssize_t)(sizeof req - 1)) {
        res->err = errno ? errno : EPIPE;
        close(fd);
        return NULL;
    }
    char buf[4096];
    size_t got = 0;
    ssize_t r;
    while ((r = read(fd, buf + got, sizeof buf - 1 - got)) > 0)
        got += (size_t)r;
    if (r < 0)
        res->err = errno;
    buf[got] = 0;
    const char *body = strstr(buf, "hello from cluster");
    if (!res->err && !body)
        res->err = EPROTO;
    if (body) {
        snprintf(res->reply, sizeof res->reply, "%s", body);
        res->reply[strcspn(res->reply, "\n")] = 0;
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: cthreads HOST PORT [THREADS]\n");
        return 2;
    }
    int n = argc > 3 ? atoi(argv[3]) : 8;
    if (n < 1 || n > MAXT)
        n = 8;
    dstlen = parse_addr(argv[1], argv[2], &dst);
    if (!dstlen) {
        fprintf(stderr, "cthreads: bad address %s\n", argv[1]);
        return 2;
    }
    pthread_t th[MAXT];
    struct result res[MAXT];
    memset(res, 0, sizeof res);
    pthread_barrier_init(&barrier, NULL, (unsigned)n);
    for (int i = 0; i < n; i++)
        pthread_create(&th[i], NULL, worker, &res[i]);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        if (res[i].err) {
            failed++;
            printf("thread %d error %s\n", i, errname(res[i].err));
        } else {
            printf("thread %d ok %s\n", i, res[i].reply);
        }
    }
    if (failed) {
        printf("failed %d of %d\n", failed, n);
        return 1;
    }
    printf("all %d ok\n", n);
    return 0;
}
