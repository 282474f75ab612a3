/* stopfloor MODE PROGRAM [ARG...]
 *
 * What one intercepted syscall costs at the least on this machine, whatever the tracer is
 * written in: runs PROGRAM under a seccomp filter that hands open/openat to a supervisor
 * written in C, which does nothing but let each one go on. scripts/bench runs
 * `csysloop open N PATH` under it, next to the same loop under ktrace.
 *   trace        SECCOMP_RET_TRACE; the supervisor is a ptrace tracer that reads the
 *                registers (as any tracer must, to see the arguments) and resumes, sleeping
 *                in waitpid between stops
 *   trace-spin   the same, polling waitpid(WNOHANG) instead of sleeping (so its vCPU
 *                never halts)
 *   notif        SECCOMP_RET_USER_NOTIF; the supervisor receives each notification and
 *                answers "continue", sleeping in the receive ioctl between them
 *   notif-spin   the same, polling the listener with poll(0) instead of sleeping
 * PROGRAM's own output is passed through; exits with its status (125: set-up failed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *what)
{
    fprintf(stderr, "stopfloor: %s: %s\n", what, strerror(errno));
    return 125;
}

/* open and openat go to `action`; every other syscall runs. */
static int install_filter(unsigned int action, unsigned int flags)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_open, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof code / sizeof code[0], code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static int pass_fd(int sock, int fd)
{
    char control[CMSG_SPACE(sizeof(int))];
    char byte = 'f';
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    memset(control, 0, sizeof control);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    return sendmsg(sock, &msg, 0) == 1 ? 0 : -1;
}

static int take_fd(int sock)
{
    char control[CMSG_SPACE(sizeof(int))];
    char byte;
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    if (recvmsg(sock, &msg, 0) != 1)
        return -1;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg == NULL || cmsg->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
    return fd;
}

static int exit_status(int status)
{
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int run_tracer(pid_t child, int spin)
{
    int status;
    if (waitpid(child, &status, WUNTRACED) != child)
        return fail("waitpid");
    if (ptrace(PTRACE_SEIZE, child, 0, PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL) != 0)
        return fail("PTRACE_SEIZE");
    kill(child, SIGCONT);
    for (;;) {
        pid_t got;
        do
            got = waitpid(child, &status, __WALL | (spin ? WNOHANG : 0));
        while (got == 0);
        if (got < 0)
            return fail("waitpid");
        if (WIFEXITED(status) || WIFSIGNALED(status))
            return exit_status(status);
        if (status >> 8 == (SIGTRAP | (PTRACE_EVENT_SECCOMP << 8))) {
            struct user_regs_struct regs;
            ptrace(PTRACE_GETREGS, child, 0, &regs);
            ptrace(PTRACE_CONT, child, 0, 0);
        } else {
            int sig = WSTOPSIG(status);
            int pass = (sig == SIGSTOP || sig == SIGCONT || sig == SIGTRAP) ? 0 : sig;
            ptrace(PTRACE_CONT, child, 0, pass);
        }
    }
}

static int run_supervisor(pid_t child, int listener, int go, int spin)
{
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) != 0)
        return fail("SECCOMP_GET_NOTIF_SIZES");
    struct seccomp_notif *req = calloc(1, sizes.seccomp_notif);
    struct seccomp_notif_resp *resp = calloc(1, sizes.seccomp_notif_resp);
    if (req == NULL || resp == NULL || write(go, "g", 1) != 1)
        return fail("start");
    for (;;) {
        struct pollfd p = {listener, POLLIN, 0};
        int ready = poll(&p, 1, spin ? 0 : -1);
        if (ready < 0 && errno != EINTR)
            return fail("poll");
        if (ready <= 0)
            continue;
        if (p.revents & (POLLHUP | POLLERR))
            break; /* every task using the filter is gone */
        memset(req, 0, sizes.seccomp_notif);
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, req) != 0)
            continue; /* the task went away, or a signal interrupted it */
        memset(resp, 0, sizes.seccomp_notif_resp);
        resp->id = req->id;
        resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp);
    }
    int status;
    if (waitpid(child, &status, 0) != child)
        return fail("waitpid");
    return exit_status(status);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: stopfloor trace|trace-spin|notif|notif-spin PROGRAM [ARG...]\n");
        return 2;
    }
    const char *mode = argv[1];
    int notif = strncmp(mode, "notif", 5) == 0;
    int spin = strstr(mode, "-spin") != NULL;
    if (!notif && strncmp(mode, "trace", 5) != 0) {
        fprintf(stderr, "stopfloor: unknown mode %s\n", mode);
        return 2;
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
        return fail("socketpair");
    fflush(stdout);
    pid_t child = fork();
    if (child < 0)
        return fail("fork");
    if (child == 0) {
        close(pair[0]);
        if (notif) {
            int listener = install_filter(SECCOMP_RET_USER_NOTIF, SECCOMP_FILTER_FLAG_NEW_LISTENER);
            if (listener < 0 || pass_fd(pair[1], listener) != 0)
                _exit(fail("seccomp user notification"));
            close(listener);
            char go;
            if (read(pair[1], &go, 1) != 1) /* the supervisor is listening */
                _exit(125);
        } else {
            if (install_filter(SECCOMP_RET_TRACE, 0) != 0)
                _exit(fail("seccomp"));
            raise(SIGSTOP); /* until the tracer has seized us */
        }
        execvp(argv[2], argv + 2);
        _exit(fail(argv[2]));
    }
    close(pair[1]);
    if (!notif)
        return run_tracer(child, spin);
    int listener = take_fd(pair[0]);
    if (listener < 0) {
        int status;
        waitpid(child, &status, 0);
        return exit_status(status);
    }
    return run_supervisor(child, listener, pair[0], spin);
}
