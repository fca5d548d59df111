/*
 * LD_PRELOAD shim standing in for an NVMe controller: answers the NVMe admin ioctl on one
 * device node (DCMON_SHIM_DEVICE) with a SMART/Health log read from a fixture file
 * (DCMON_SHIM_SMART_LOG, 512 bytes), so the agent's real ioctl path and nvme-cli both run
 * unchanged on a machine without NVMe. Every other fd and request goes to the real ioctl.
 *
 * DCMON_SHIM_DENY=1 makes the admin ioctl fail with EPERM for every process except nvme-cli
 * ("nvme"), to drive the agent's fallback to nvme-cli.
 * DCMON_SHIM_LOG=FILE appends one line per answered command (opcode, cdw10) for assertions.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/ioctl.h>
#include <linux/nvme_ioctl.h>

extern char *program_invocation_short_name;

static int fd_is_device(int fd, const char *dev)
{
	char link[64], target[4096];
	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, target, sizeof target - 1);
	if (n < 0)
		return 0;
	target[n] = '\0';
	return strcmp(target, dev) == 0;
}

static void log_cmd(const struct nvme_admin_cmd *c, const char *outcome)
{
	const char *path = getenv("DCMON_SHIM_LOG");
	if (!path)
		return;
	FILE *f = fopen(path, "a");
	if (!f)
		return;
	fprintf(f, "%s opcode=0x%02x nsid=0x%x cdw10=0x%08x len=%u %s\n",
		program_invocation_short_name, c->opcode, c->nsid, c->cdw10, c->data_len, outcome);
	fclose(f);
}

static int answer_admin(struct nvme_admin_cmd *c)
{
	const char *deny = getenv("DCMON_SHIM_DENY");
	if (deny && strcmp(deny, "1") == 0 && strcmp(program_invocation_short_name, "nvme") != 0) {
		log_cmd(c, "EPERM");
		errno = EPERM;
		return -1;
	}
	/* Get Log Page, log id 0x02 (SMART / Health Information). */
	if (c->opcode == 0x02 && (c->cdw10 & 0xff) == 0x02) {
		const char *fixture = getenv("DCMON_SHIM_SMART_LOG");
		unsigned char page[512] = {0};
		FILE *f = fixture ? fopen(fixture, "rb") : NULL;
		if (!f || fread(page, 1, sizeof page, f) != sizeof page) {
			if (f)
				fclose(f);
			log_cmd(c, "EIO");
			errno = EIO;
			return -1;
		}
		fclose(f);
		uint32_t len = c->data_len < sizeof page ? c->data_len : sizeof page;
		memcpy((void *)(uintptr_t)c->addr, page, len);
		c->result = 0;
		log_cmd(c, "ok");
		return 0;
	}
	/* Anything else: NVMe status "Invalid Field in Command" (0x2), as a controller would. */
	log_cmd(c, "invalid");
	return 0x2;
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);

	static int (*real_ioctl)(int, unsigned long, ...);
	if (!real_ioctl)
		real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");

	const char *dev = getenv("DCMON_SHIM_DEVICE");
	if (dev && fd_is_device(fd, dev)) {
		if (request == (unsigned long)NVME_IOCTL_ADMIN_CMD)
			return answer_admin((struct nvme_admin_cmd *)arg);
		if (request == (unsigned long)NVME_IOCTL_ID) {
			/* A controller node has no namespace id. */
			errno = ENOTTY;
			return -1;
		}
	}
	if (!real_ioctl) {
		errno = ENOSYS;
		return -1;
	}
	return real_ioctl(fd, request, arg);
}
