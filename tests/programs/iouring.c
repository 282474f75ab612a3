/* iouring: calls io_uring_setup(2) directly and prints "ok" or the errno name. */
#include <linux/io_uring.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <string.h>
#include "errname.h"

int main(void)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = syscall(__NR_io_uring_setup, 4, &p);
    if (fd < 0) {
        printf("%s\n", errname(errno));
        return 1;
    }
    printf("ok\n");
    close((int)fd);
    return 0;
}
