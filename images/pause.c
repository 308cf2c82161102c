/* The pod sandbox's pause process: holds the pod's namespaces, reaps nothing, exits on
 * SIGINT/SIGTERM. Linked statically so its image needs no libc. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    for (;;) pause();
}
