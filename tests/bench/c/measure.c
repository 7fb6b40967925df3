/* measure: runs a command and prints its wall time, CPU time and peak resident set as JSON.
 *
 *   measure [--timeout SECONDS] [--out FILE] -- PROGRAM [ARGS...]
 *
 * Why not the benchmark driver's own wait4(): Linux starts a forked child's peak RSS (ru_maxrss)
 * from the parent's resident set at the fork and keeps it across exec, so a small program
 * spawned from a 25 MB Python process reports at least 25 MB. This launcher is small, so the
 * figure is the program's own. The program's stdout and stderr pass through; the JSON line goes
 * to FILE (else to stderr). Exit status: the program's (128+signal if killed, 2 on a usage
 * error or when FILE cannot be written). */
#define _DEFAULT_SOURCE /* wait4 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t child;

static void on_alarm(int sig) {
    (void)sig;
    if (child > 0) {
        kill(child, SIGKILL); /* async-signal-safe */
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    unsigned timeout = 300;
    const char *out_path = NULL;
    int i = 1;
    while (i + 1 < argc && argv[i][0] == '-' && strcmp(argv[i], "--") != 0) {
        if (strcmp(argv[i], "--timeout") == 0) {
            timeout = (unsigned)strtoul(argv[i + 1], NULL, 10);
        } else if (strcmp(argv[i], "--out") == 0) {
            out_path = argv[i + 1];
        } else {
            break;
        }
        i += 2;
    }
    if (i < argc && strcmp(argv[i], "--") == 0) {
        i++;
    }
    if (i >= argc) {
        fprintf(stderr, "usage: measure [--timeout SECONDS] [--out FILE] -- PROGRAM [ARGS...]\n");
        return 2;
    }
    double t0 = now_s();
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0) {
        execvp(argv[i], &argv[i]);
        perror(argv[i]);
        _exit(127);
    }
    /* Bounded: after the timeout, SIGALRM kills the program and wait4 reaps it. */
    child = pid;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    alarm(timeout);
    int status = 0;
    struct rusage ru;
    for (;;) {
        pid_t got = wait4(pid, &status, 0, &ru);
        if (got == pid) {
            break;
        }
        if (got < 0 && errno == EINTR) {
            continue;
        }
        perror("wait4");
        return 2;
    }
    alarm(0);
    double wall = now_s() - t0;
    FILE *out = out_path ? fopen(out_path, "w") : stderr;
    if (!out) {
        perror(out_path);
        return 2;
    }
    fprintf(out,
            "{\"wall_ms\": %.3f, \"cpu_ms\": %.3f, \"maxrss_kb\": %ld, \"status\": %d}\n",
            wall * 1000.0,
            (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000.0 +
                (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000.0,
            ru.ru_maxrss, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    if (fclose(out) != 0) {
        return 2;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
