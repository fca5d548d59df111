/*
 * A stand-in libnvidia-ml.so for the NVIDIA collector's tests: two GPUs with fixed readings,
 * implementing the NVML entry points the collector calls with NVML's C ABI (types and return
 * codes as in nvml.h). GPU 0 is an "NVIDIA H100 80GB HBM3" with a fan and no ECC errors;
 * GPU 1 is a passively cooled "NVIDIA A100-SXM4-40GB" (fan: NOT_SUPPORTED) with ECC errors and
 * ECC-reporting on.
 *
 * FAKE_NVML_INIT_FAIL=1 makes nvmlInit fail with NVML_ERROR_DRIVER_NOT_LOADED, as on a host
 * whose driver is not loaded. FAKE_NVML_LOG=FILE appends "init" / "shutdown" lines.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_NOT_SUPPORTED = 3,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_DRIVER_NOT_LOADED = 9,
};

struct fake_gpu {
	const char *name, *uuid, *bus_id;
	unsigned temp_c, power_mw, limit_mw, util_gpu, util_mem;
	int has_fan;
	unsigned fan_pct, sm_mhz, mem_mhz;
	unsigned long long mem_total, mem_used;
	int has_ecc;
	unsigned long long ecc_corrected, ecc_uncorrected;
	unsigned pcie_gen, pcie_width, pstate;
};

static struct fake_gpu gpus[2] = {
	{"NVIDIA H100 80GB HBM3", "GPU-11111111-2222-3333-4444-555555555555", "00000000:18:00.0",
	 45, 123450, 700000, 87, 33, 1, 40, 1980, 2619,
	 85899345920ULL, 21474836480ULL, 1, 0, 0, 5, 16, 0},
	{"NVIDIA A100-SXM4-40GB", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "00000000:3B:00.0",
	 61, 250000, 400000, 100, 75, 0, 0, 1410, 1215,
	 42949672960ULL, 10737418240ULL, 1, 12, 3, 4, 8, 2},
};

static int initialized;

static void log_line(const char *what)
{
	const char *path = getenv("FAKE_NVML_LOG");
	FILE *f = path ? fopen(path, "a") : NULL;
	if (f) {
		fprintf(f, "%s\n", what);
		fclose(f);
	}
}

typedef struct fake_gpu *nvmlDevice_t;

static nvmlReturn_t check(nvmlDevice_t d)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (d != &gpus[0] && d != &gpus[1])
		return NVML_ERROR_INVALID_ARGUMENT;
	return NVML_SUCCESS;
}

static nvmlReturn_t copy_str(char *dst, unsigned len, const char *src)
{
	if (strlen(src) + 1 > len)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	strcpy(dst, src);
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void)
{
	const char *fail = getenv("FAKE_NVML_INIT_FAIL");
	if (fail && strcmp(fail, "1") == 0)
		return NVML_ERROR_DRIVER_NOT_LOADED;
	initialized++; /* NVML counts nvmlInit calls; the last nvmlShutdown shuts down */
	log_line("init");
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void)
{
	if (initialized > 0)
		initialized--;
	log_line("shutdown");
	return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r)
{
	switch (r) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
	case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
	default: return "Unknown Error";
	}
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned len)
{
	return copy_str(version, len, "550.54.15");
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	*count = 2;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (index > 1)
		return NVML_ERROR_INVALID_ARGUMENT;
	*device = &gpus[index];
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned len)
{
	nvmlReturn_t r = check(d);
	return r ? r : copy_str(name, len, d->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned len)
{
	nvmlReturn_t r = check(d);
	return r ? r : copy_str(uuid, len, d->uuid);
}

typedef struct {
	char busIdLegacy[16];
	unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
	char busId[32];
} nvmlPciInfo_t;

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	memset(pci, 0, sizeof *pci);
	strncpy(pci->busId, d->bus_id, sizeof pci->busId - 1);
	pci->pciDeviceId = 0x233010de;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned *temp)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (sensor != 0) /* NVML_TEMPERATURE_GPU */
		return NVML_ERROR_INVALID_ARGUMENT;
	*temp = d->temp_c;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned *mw)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*mw = d->power_mw;
	return r;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t d, unsigned *mw)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*mw = d->limit_mw;
	return r;
}

typedef struct { unsigned gpu, memory; } nvmlUtilization_t;

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u)
{
	nvmlReturn_t r = check(d);
	if (!r) {
		u->gpu = d->util_gpu;
		u->memory = d->util_mem;
	}
	return r;
}

nvmlReturn_t nvmlDeviceGetFanSpeed_v2(nvmlDevice_t d, unsigned fan, unsigned *pct)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!d->has_fan)
		return NVML_ERROR_NOT_SUPPORTED;
	if (fan != 0)
		return NVML_ERROR_INVALID_ARGUMENT;
	*pct = d->fan_pct;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned *mhz)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	switch (type) {
	case 1: *mhz = d->sm_mhz; return NVML_SUCCESS;  /* NVML_CLOCK_SM */
	case 2: *mhz = d->mem_mhz; return NVML_SUCCESS; /* NVML_CLOCK_MEM */
	default: return NVML_ERROR_INVALID_ARGUMENT;
	}
}

typedef struct {
	unsigned version;
	unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	/* NVML_STRUCT_VERSION(Memory, 2) */
	if (m->version != (unsigned)(sizeof(nvmlMemory_v2_t) | (2u << 24)))
		return NVML_ERROR_INVALID_ARGUMENT;
	m->total = d->mem_total;
	m->used = d->mem_used;
	m->reserved = 0;
	m->free = d->mem_total - d->mem_used;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int error_type, int counter_type,
					  unsigned long long *count)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!d->has_ecc)
		return NVML_ERROR_NOT_SUPPORTED;
	if (counter_type != 1) /* only NVML_AGGREGATE_ECC is exercised */
		return NVML_ERROR_INVALID_ARGUMENT;
	*count = error_type == 0 ? d->ecc_corrected : d->ecc_uncorrected;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t d, unsigned *gen)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*gen = d->pcie_gen;
	return r;
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t d, unsigned *width)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*width = d->pcie_width;
	return r;
}

nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t d, int *pstate)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*pstate = (int)d->pstate;
	return r;
}

/*
 * ---- XID events (nvmlEventSet*, nvmlDeviceRegisterEvents) ----
 *
 * FAKE_NVML_XID_EVENTS=FILE scripts the XID events: one "GPU-INDEX XID" line per event, in
 * order. Each line happens once: a wait delivers the next line no wait has delivered yet, in
 * this process or an earlier one (FILE.delivered keeps the count), to a set registered for that
 * GPU, as the driver delivers each XID to the sets registered when it happens; so an agent
 * restarted later does not see old events again. The file is read again at each wait, so a
 * test can append while the agent runs. With no line left, the wait sleeps in steps of 10 ms
 * until the timeout and returns NVML_ERROR_TIMEOUT, as the real call does. Signatures, the
 * event data layout and the return codes are nvml.h's.
 */
#include <time.h>

#define FAKE_NVML_ERROR_TIMEOUT 10
#define FAKE_NVML_EVENT_TYPE_XID 0x0000000000000008ULL
#define FAKE_XID_MAX_GPUS 8

struct nvmlEventSet_st {
	unsigned long long registered[FAKE_XID_MAX_GPUS]; /* event types per GPU index */
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

typedef struct {
	nvmlDevice_t device;
	unsigned long long eventType;
	unsigned long long eventData;
	unsigned int gpuInstanceId;
	unsigned int computeInstanceId;
} nvmlEventData_t;

static long xid_gpu_index(nvmlDevice_t d)
{
	for (unsigned long i = 0; i < sizeof gpus / sizeof gpus[0]; i++)
		if (d == &gpus[i])
			return (long)i;
	return -1;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (!set)
		return NVML_ERROR_INVALID_ARGUMENT;
	*set = calloc(1, sizeof **set);
	return *set ? NVML_SUCCESS : 999; /* NVML_ERROR_UNKNOWN */
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	free(set);
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*types = FAKE_NVML_EVENT_TYPE_XID;
	return r;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set)
{
	nvmlReturn_t r = check(d);
	long index = xid_gpu_index(d);
	if (r)
		return r;
	if (!set)
		return NVML_ERROR_INVALID_ARGUMENT;
	if ((types & ~FAKE_NVML_EVENT_TYPE_XID) || index < 0 || index >= FAKE_XID_MAX_GPUS)
		return NVML_ERROR_NOT_SUPPORTED;
	set->registered[index] |= types;
	return NVML_SUCCESS;
}

/* Line `n` (from 0) of the script: 1 with the GPU index and XID, 0 when there is none. */
static int xid_script_line(const char *path, long n, long *index, unsigned long long *xid)
{
	FILE *f = fopen(path, "r");
	int found = 0;
	if (!f)
		return 0;
	for (long i = 0; i <= n; i++)
		if (fscanf(f, "%ld %llu", index, xid) != 2)
			break;
		else if (i == n)
			found = 1;
	fclose(f);
	return found;
}

/* FILE.delivered: how many lines of the script were delivered (read, or written when `set`). */
static long xid_delivered(const char *path, long set)
{
	char name[4096];
	long n = 0;
	FILE *f;
	snprintf(name, sizeof name, "%s.delivered", path);
	f = fopen(name, set >= 0 ? "w" : "r");
	if (!f)
		return 0;
	if (set >= 0)
		fprintf(f, "%ld\n", n = set);
	else if (fscanf(f, "%ld", &n) != 1)
		n = 0;
	fclose(f);
	return n;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (!set || !data)
		return NVML_ERROR_INVALID_ARGUMENT;
	for (unsigned int waited = 0;; waited += 10) {
		const char *path = getenv("FAKE_NVML_XID_EVENTS");
		long index, next = path ? xid_delivered(path, -1) : 0;
		unsigned long long xid;
		while (path && xid_script_line(path, next, &index, &xid)) {
			xid_delivered(path, ++next);
			if (index < 0 || index >= (long)(sizeof gpus / sizeof gpus[0]) || index >= FAKE_XID_MAX_GPUS ||
			    !(set->registered[index] & FAKE_NVML_EVENT_TYPE_XID))
				continue;
			memset(data, 0, sizeof *data);
			data->device = &gpus[index];
			data->eventType = FAKE_NVML_EVENT_TYPE_XID;
			data->eventData = xid;
			return NVML_SUCCESS;
		}
		if (waited >= timeoutms)
			return FAKE_NVML_ERROR_TIMEOUT;
		nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 10 * 1000 * 1000}, NULL);
	}
}
