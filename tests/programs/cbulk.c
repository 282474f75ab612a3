/* cbulk HOST PORT UP DOWN
 *
 * Client of the cluster's bulk service (tests/servers/cluster_services.py): sends the
 * header "KTBULK01" + DOWN (u64 BE), then UP bytes of the bulk pattern, half-closes, and
 * reads "KTBULKOK" + uploaded length + sha256 followed by DOWN bytes until EOF. Prints
 *   sent <UP> <sha256 sent>
 *   server <length the server got> <sha256 the server computed>
 *   received <bytes> <sha256 received>
 * and exits 0 only if the server saw exactly what was sent and DOWN bytes came back.
 * Byte k of the pattern is ((k & 0xffff) % 251) ^ ((k >> 16) & 0xff).
 */
#include <unistd.h>
#include "errname.h"
#include "netutil.h"
#include "sha256.h"

static unsigned char pat(uint64_t k)
{
    return (unsigned char)(((k & 0xffff) % 251) ^ ((k >> 16) & 0xff));
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_full(int fd, unsigned char *p, size_t n)
{
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: cbulk HOST PORT UP DOWN\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t up = strtoull(argv[3], NULL, 10), down = strtoull(argv[4], NULL, 10);
    struct sockaddr_storage dst;
    socklen_t len = parse_addr(argv[1], argv[2], &dst);
    int fd = socket(dst.ss_family, SOCK_STREAM, 0);
    if (!len || fd < 0 || connect(fd, (struct sockaddr *)&dst, len) < 0) {
        printf("error %s\n", errname(errno));
        return 1;
    }
    static unsigned char buf[1 << 16];
    memcpy(buf, "KTBULK01", 8);
    for (int i = 0; i < 8; i++)
        buf[8 + i] = (unsigned char)(down >> (56 - 8 * i));
    struct sha256 s;
    char hex[65], server_hex[65];
    if (write_all(fd, buf, 16) < 0)
        goto ioerr;
    sha256_init(&s);
    for (uint64_t off = 0; off < up;) {
        size_t n = up - off < sizeof buf ? (size_t)(up - off) : sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = pat(off + i);
        sha256_update(&s, buf, n);
        if (write_all(fd, buf, n) < 0)
            goto ioerr;
        off += n;
    }
    sha256_hex(&s, hex);
    printf("sent %llu %s\n", (unsigned long long)up, hex);
    if (shutdown(fd, SHUT_WR) < 0)
        goto ioerr;
    if (read_full(fd, buf, 48) < 0 || memcmp(buf, "KTBULKOK", 8) != 0) {
        printf("error bad-reply-header\n");
        return 1;
    }
    uint64_t server_len = 0;
    for (int i = 0; i < 8; i++)
        server_len = server_len << 8 | buf[8 + i];
    for (int i = 0; i < 32; i++)
        snprintf(server_hex + 2 * i, 3, "%02x", buf[16 + i]);
    printf("server %llu %s\n", (unsigned long long)server_len, server_hex);
    sha256_init(&s);
    uint64_t got = 0;
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0) {
        sha256_update(&s, buf, (size_t)r);
        got += (uint64_t)r;
    }
    if (r < 0)
        goto ioerr;
    sha256_hex(&s, hex);
    printf("received %llu %s\n", (unsigned long long)got, hex);
    close(fd);
    return (server_len == up && got == down) ? 0 : 1;
ioerr:
    printf("error %s\n", errname(errno));
    return 1;
}
