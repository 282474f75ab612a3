/* cuntraced: starts a child with clone(CLONE_UNTRACED) (a child a tracer is not told about),
 * prints "child <pid>", then waits for its stdin to close. The child sleeps. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static char stack[64 * 1024];

static int child(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return 0;
}

int main(void)
{
    int pid = clone(child, stack + sizeof stack, CLONE_UNTRACED | SIGCHLD, NULL);
    if (pid < 0) {
        perror("clone");
        return 1;
    }
    printf("child %d\n", pid);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {
    }
    return 0;
}
