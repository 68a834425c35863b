/* tcp-xfer: the guest's side of dvmm's TCP checks, a netcat with large buffers.
 *
 *   tcp-xfer HOST PORT [BYTES]
 *
 * Connects to HOST:PORT (an IPv4 address), sends standard input (or BYTES zero bytes)
 * to end of file, shuts its sending side, then copies what the peer sends to standard
 * output until the peer closes. Every read and write moves up to 256 KiB: busybox's nc
 * moves 1 KiB a system call, so on a host whose KVM emulates the guest's kernel
 * (PVM) its TCP stack sent one 1 KiB segment a call and the checks measured nc, not
 * the network. Exits non-zero, with a message, on any error.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static char buf[CHUNK];

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Copies `from` to `to` until end of file; 0, or -1 with a message naming `what`. */
static int copy(int from, int to, const char *what) {
  for (;;) {
    ssize_t n = read(from, buf, CHUNK);
    if (n < 0 && errno == EINTR)
      continue;
    if (n == 0)
      return 0;
    if (n < 0 || write_all(to, buf, (size_t)n) < 0) {
      perror(what);
      return -1;
    }
  }
}

int main(int argc, char **argv) {
  if (argc != 3 && argc != 4) {
    fprintf(stderr, "usage: tcp-xfer HOST PORT [BYTES]\n");
    return 2;
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) {
    fprintf(stderr, "tcp-xfer: %s is not an IPv4 address\n", argv[1]);
    return 2;
  }
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
    perror("tcp-xfer: connect");
    return 1;
  }
  if (argc == 4) {
    unsigned long long left = strtoull(argv[3], NULL, 10);
    while (left > 0) {
      size_t n = left < CHUNK ? (size_t)left : CHUNK;
      if (write_all(s, buf, n) < 0) {
        perror("tcp-xfer: send");
        return 1;
      }
      left -= n;
    }
  } else if (copy(0, s, "tcp-xfer: sending standard input") < 0) {
    return 1;
  }
  shutdown(s, SHUT_WR);
  return copy(s, 1, "tcp-xfer: receiving") < 0 ? 1 : 0;
}
