/* udpwg: tiny WireGuard-like UDP peer for the flowguard lab (from the flowtable reproduction).
 *   udpwg peer <bind_ip> <bind_port> <dst_ip> <dst_port> <interval_ms> <tag>
 *       send "<tag> seq=N" every interval_ms to dst, print every datagram received.
 *   udpwg echo <bind_ip> <bind_port> <tag>
 *       print every datagram received and answer it with "<tag> echo: <payload>".
 *   udpwg now
 *       print the monotonic clock (the clock of every log line), for timestamps in scripts.
 * Every line: "<monotonic secs> <tag> tx|rx ...". Runs until killed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int mksock(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); exit(1); }
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { fprintf(stderr, "bad ip %s\n", ip); exit(1); }
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); exit(1); }
    return s;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 8 && !strcmp(argv[1], "peer")) {
        int s = mksock(argv[2], atoi(argv[3]));
        struct sockaddr_in d = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[5])) };
        inet_pton(AF_INET, argv[4], &d.sin_addr);
        int iv = atoi(argv[6]);
        const char *tag = argv[7];
        double next = now();
        unsigned long seq = 0;
        for (;;) {
            double t = now();
            if (t >= next) {
                char buf[128];
                int n = snprintf(buf, sizeof buf, "%s seq=%lu", tag, ++seq);
                if (sendto(s, buf, n, 0, (struct sockaddr *)&d, sizeof d) < 0)
                    printf("%.3f %s txerr seq=%lu %s\n", t, tag, seq, strerror(errno));
                else
                    printf("%.3f %s tx seq=%lu\n", t, tag, seq);
                next += iv / 1000.0;
                continue;
            }
            struct pollfd p = { .fd = s, .events = POLLIN };
            int ms = (int)((next - t) * 1000) + 1;
            if (poll(&p, 1, ms) > 0) {
                char buf[256]; struct sockaddr_in f; socklen_t fl = sizeof f;
                ssize_t n = recvfrom(s, buf, sizeof buf - 1, 0, (struct sockaddr *)&f, &fl);
                if (n < 0) continue;
                buf[n] = 0;
                char ip[32]; inet_ntop(AF_INET, &f.sin_addr, ip, sizeof ip);
                printf("%.3f %s rx from %s:%d '%s'\n", now(), tag, ip, ntohs(f.sin_port), buf);
            }
        }
    } else if (argc == 2 && !strcmp(argv[1], "now")) {
        printf("%.3f\n", now());
        return 0;
    } else if (argc == 5 && !strcmp(argv[1], "echo")) {
        int s = mksock(argv[2], atoi(argv[3]));
        const char *tag = argv[4];
        for (;;) {
            char buf[256], out[400]; struct sockaddr_in f; socklen_t fl = sizeof f;
            ssize_t n = recvfrom(s, buf, sizeof buf - 1, 0, (struct sockaddr *)&f, &fl);
            if (n < 0) continue;
            buf[n] = 0;
            char ip[32]; inet_ntop(AF_INET, &f.sin_addr, ip, sizeof ip);
            printf("%.3f %s rx from %s:%d '%s'\n", now(), tag, ip, ntohs(f.sin_port), buf);
            int m = snprintf(out, sizeof out, "%s echo: %s", tag, buf);
            sendto(s, out, m, 0, (struct sockaddr *)&f, fl);
        }
    }
    fprintf(stderr, "usage: udpwg peer BIND_IP BIND_PORT DST_IP DST_PORT INTERVAL_MS TAG | echo BIND_IP BIND_PORT TAG | now\n");
    return 2;
}
