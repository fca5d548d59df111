/*
 * A stand-in libnvidia-ml.so for the NVIDIA collector's tests: two GPUs with fixed readings,
 * implementing the NVML entry points the collector calls with NVML's C ABI (types and return
 * codes as in nvml.h). GPU 0 is an "NVIDIA H100 80GB HBM3" with a fan and no ECC errors;
 * GPU 1 is a passively cooled "NVIDIA A100-SXM4-40GB" (fan: NOT_SUPPORTED) with ECC errors and
 * ECC-reporting on.
 *
 * FAKE_NVML_INIT_FAIL=1 makes nvmlInit fail with NVML_ERROR_DRIVER_NOT_LOADED, as on a host
 * whose driver is not loaded. FAKE_NVML_LOG=FILE appends "init" / "shutdown" lines.
 *
 * Health readings: GPU 0 has row remapping (no page retirement, as on Ampere and later) and
 * four NVLinks (link 3 down); GPU 1 retires pages and has no NVLink. Scripted faults, read when
 * the library is loaded, each a comma-separated list of GPU indices:
 *   FAKE_NVML_GPUS=3         enumerate a third GPU (an H100 like GPU 0);
 *   FAKE_NVML_LOST=1         every call on that GPU answers NVML_ERROR_GPU_IS_LOST;
 *   FAKE_NVML_HANG=2         every call on that GPU blocks forever (a wedged driver);
 *   FAKE_NVML_NO_ECC=0       ECC, row remapping and page retirement: NVML_ERROR_NOT_SUPPORTED.
 * FAKE_NVML_PROCS="GPU:PID:BYTES;..." lists the compute processes on each GPU (BYTES "na" is
 * NVML_VALUE_NOT_AVAILABLE, as under MIG without permission); none by default.
 * FAKE_NVML_CALLS=FILE appends one line per device call ("GPU_INDEX FUNCTION"), for counting.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_NOT_SUPPORTED = 3,
	NVML_ERROR_NOT_FOUND = 6,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_DRIVER_NOT_LOADED = 9,
	NVML_ERROR_GPU_IS_LOST = 15,
};

#define FAKE_MAX_GPUS 3
#define FAKE_NVLINKS 4

struct fake_gpu {
	const char *name, *uuid, *bus_id;
	unsigned temp_c, power_mw, limit_mw, util_gpu, util_mem;
	int has_fan;
	unsigned fan_pct, sm_mhz, mem_mhz;
	unsigned long long mem_total, mem_used;
	int has_ecc;
	unsigned long long ecc_corrected, ecc_uncorrected;
	unsigned pcie_gen, pcie_width, pstate;
	/* volatile (since the driver loaded) corrected, uncorrected */
	unsigned long long ecc_volatile_corrected, ecc_volatile_uncorrected;
	int has_remap; /* nvmlDeviceGetRemappedRows */
	unsigned remap_corr, remap_unc, remap_pending, remap_failure;
	int has_retire; /* nvmlDeviceGetRetiredPages */
	unsigned retired_sbe, retired_dbe, retired_pending;
	/* nvmlDeviceGetViolationStatus, ns, by nvmlPerfPolicyType_t (0..5); ~0 is NOT_SUPPORTED */
	unsigned long long violation_ns[6];
	unsigned long long clocks_event_reasons;
	unsigned max_gen, max_width, pcie_replays, pcie_tx_kbps, pcie_rx_kbps;
	int has_nvlink;
	int nvlink_active[FAKE_NVLINKS];
	/* per link: replay, recovery, CRC flit, CRC data (nvmlNvLinkErrorCounter_t 0..3) */
	unsigned long long nvlink_errors[FAKE_NVLINKS][4];
	unsigned long long energy_mj;
	/* the sample buffer: one sample every 1000 us, values cycling through these */
	unsigned util_gpu_cycle[4], util_mem_cycle[4];
	unsigned long long sample_clock_us; /* the newest sample's time stamp */
	int lost, hang;
	/* field values: SW thermal, HW thermal, HW power brake throttle time (ns); NVLink data
	 * transmitted and received per link (KiB) */
	unsigned long long throttle_field_ns[3];
	unsigned long long nvlink_tx_kib[FAKE_NVLINKS], nvlink_rx_kib[FAKE_NVLINKS];
	unsigned nprocs;
	unsigned proc_pid[8];
	unsigned long long proc_bytes[8];
};

#define NS ~0ULL /* violation counter not supported */

static struct fake_gpu gpus[FAKE_MAX_GPUS] = {
	{"NVIDIA H100 80GB HBM3", "GPU-11111111-2222-3333-4444-555555555555", "00000000:18:00.0",
	 45, 123450, 700000, 87, 33, 1, 40, 1980, 2619,
	 85899345920ULL, 21474836480ULL, 1, 0, 0, 5, 16, 0,
	 0, 0,
	 1, 2, 1, 1, 0,
	 0, 0, 0, 0,
	 {1500000000ULL, 250000000ULL, NS, 0, 42000000000ULL, 0},
	 0x4, /* SW power cap */
	 5, 16, 0, 1000, 2000,
	 1, {1, 1, 1, 0},
	 {{1, 0, 5, 0}, {0, 0, 0, 0}, {0, 2, 0, 7}, {0, 0, 0, 0}},
	 123456789ULL,
	 {50, 100, 70, 80}, {10, 20, 30, 40}, 0, 0, 0,
	 {500000000ULL, 0, 2000000000ULL}, {1000, 2000, 3000, 0}, {4000, 5000, 6000, 0},
	 0, {0}, {0}},
	{"NVIDIA A100-SXM4-40GB", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "00000000:3B:00.0",
	 61, 250000, 400000, 100, 75, 0, 0, 1410, 1215,
	 42949672960ULL, 10737418240ULL, 1, 12, 3, 4, 8, 2,
	 2, 1,
	 0, 0, 0, 0, 0,
	 1, 2, 1, 1,
	 {0, 3000000000ULL, 0, 0, 0, 0},
	 0x20 | 0x40, /* SW thermal slowdown, HW thermal slowdown */
	 4, 16, 7, 500, 250,
	 0, {0, 0, 0, 0},
	 {{0}},
	 5000000ULL,
	 {100, 100, 100, 100}, {75, 75, 75, 75}, 0, 0, 0,
	 {3000000000ULL, 1000000000ULL, 0}, {0}, {0},
	 0, {0}, {0}},
	{"NVIDIA H100 80GB HBM3", "GPU-33333333-2222-3333-4444-555555555555", "00000000:5E:00.0",
	 40, 100000, 700000, 10, 5, 1, 30, 1980, 2619,
	 85899345920ULL, 8589934592ULL, 1, 0, 0, 5, 16, 0,
	 0, 0,
	 1, 0, 0, 0, 0,
	 0, 0, 0, 0,
	 {0, 0, NS, 0, 0, 0},
	 0x1, /* idle */
	 5, 16, 0, 10, 20,
	 0, {0, 0, 0, 0},
	 {{0}},
	 1000ULL,
	 {10, 10, 10, 10}, {5, 5, 5, 5}, 0, 0, 0,
	 {0, 0, 0}, {0}, {0},
	 0, {0}, {0}},
};

static int initialized;
static unsigned gpu_count = 2;

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

/* Sets the `field` flag of each GPU listed in env var `name` ("1,2"). */
static void mark_gpus(const char *name, size_t field)
{
	const char *list = getenv(name);
	for (const char *p = list; p && *p; p++) {
		if (*p >= '0' && *p < '0' + FAKE_MAX_GPUS)
			*(int *)((char *)&gpus[*p - '0'] + field) = 1;
	}
}

static void log_call(nvmlDevice_t d, const char *fn)
{
	const char *path = getenv("FAKE_NVML_CALLS");
	FILE *f = path ? fopen(path, "a") : NULL;
	if (f) {
		fprintf(f, "%d %s\n", (int)(d - gpus), fn);
		fclose(f);
	}
}

#define check(d) check_call(d, __func__)

static nvmlReturn_t check_call(nvmlDevice_t d, const char *fn)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (d < &gpus[0] || d >= &gpus[gpu_count])
		return NVML_ERROR_INVALID_ARGUMENT;
	log_call(d, fn);
	if (d->hang) {
		for (;;)
			sleep(3600);
	}
	if (d->lost)
		return NVML_ERROR_GPU_IS_LOST;
	return NVML_SUCCESS;
}

static nvmlReturn_t copy_str(char *dst, unsigned len, const char *src)
{
	if (strlen(src) + 1 > len)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	strcpy(dst, src);
	return NVML_SUCCESS;
}

/* The scripted faults and processes, read when the library is loaded (before any nvmlInit). */
__attribute__((constructor)) static void read_script(void)
{
	const char *count = getenv("FAKE_NVML_GPUS");
	if (count && strcmp(count, "3") == 0)
		gpu_count = 3;
	mark_gpus("FAKE_NVML_LOST", offsetof(struct fake_gpu, lost));
	mark_gpus("FAKE_NVML_HANG", offsetof(struct fake_gpu, hang));
	const char *no_ecc = getenv("FAKE_NVML_NO_ECC");
	for (const char *p = no_ecc; p && *p; p++) {
		if (*p >= '0' && *p < '0' + FAKE_MAX_GPUS) {
			struct fake_gpu *g = &gpus[*p - '0'];
			g->has_ecc = g->has_remap = g->has_retire = 0;
		}
	}
	const char *procs = getenv("FAKE_NVML_PROCS");
	while (procs && *procs) {
		unsigned gpu, pid;
		unsigned long long bytes = ~0ULL;
		int used = 0;
		if (sscanf(procs, "%u:%u:%llu%n", &gpu, &pid, &bytes, &used) < 3) {
			used = 0;
			if (sscanf(procs, "%u:%u:na%n", &gpu, &pid, &used) < 2 || used == 0)
				break;
			bytes = ~0ULL;
		}
		if (gpu < FAKE_MAX_GPUS && gpus[gpu].nprocs < 8) {
			struct fake_gpu *g = &gpus[gpu];
			g->proc_pid[g->nprocs] = pid;
			g->proc_bytes[g->nprocs] = bytes;
			g->nprocs++;
		}
		procs += used;
		if (*procs == ';')
			procs++;
	}
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
	case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
	case NVML_ERROR_NOT_FOUND: return "Not Found";
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
	*count = gpu_count;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device)
{
	if (!initialized)
		return NVML_ERROR_UNINITIALIZED;
	if (index >= gpu_count)
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
	if (error_type != 0 && error_type != 1)
		return NVML_ERROR_INVALID_ARGUMENT;
	switch (counter_type) {
	case 0: /* NVML_VOLATILE_ECC */
		*count = error_type == 0 ? d->ecc_volatile_corrected : d->ecc_volatile_uncorrected;
		break;
	case 1: /* NVML_AGGREGATE_ECC */
		*count = error_type == 0 ? d->ecc_corrected : d->ecc_uncorrected;
		break;
	default:
		return NVML_ERROR_INVALID_ARGUMENT;
	}
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

nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t d, unsigned *gen)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*gen = d->max_gen;
	return r;
}

nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t d, unsigned *width)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*width = d->max_width;
	return r;
}

nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t d, unsigned *value)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*value = d->pcie_replays;
	return r;
}

/* counter: NVML_PCIE_UTIL_TX_BYTES 0, NVML_PCIE_UTIL_RX_BYTES 1; KB/s */
nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned *value)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	switch (counter) {
	case 0: *value = d->pcie_tx_kbps; return NVML_SUCCESS;
	case 1: *value = d->pcie_rx_kbps; return NVML_SUCCESS;
	default: return NVML_ERROR_INVALID_ARGUMENT;
	}
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned *corr, unsigned *unc,
				       unsigned *pending, unsigned *failure)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!d->has_remap)
		return NVML_ERROR_NOT_SUPPORTED;
	*corr = d->remap_corr;
	*unc = d->remap_unc;
	*pending = d->remap_pending;
	*failure = d->remap_failure;
	return NVML_SUCCESS;
}

/* cause: NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS 0, _DOUBLE_BIT_ECC_ERROR 1.
 * A count too small for the pages answers NVML_ERROR_INSUFFICIENT_SIZE with the count needed. */
nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t d, int cause, unsigned *count,
				       unsigned long long *addresses)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!d->has_retire)
		return NVML_ERROR_NOT_SUPPORTED;
	if (cause != 0 && cause != 1)
		return NVML_ERROR_INVALID_ARGUMENT;
	unsigned n = cause == 0 ? d->retired_sbe : d->retired_dbe;
	if (*count < n) {
		*count = n;
		return NVML_ERROR_INSUFFICIENT_SIZE;
	}
	for (unsigned i = 0; i < n; i++)
		addresses[i] = 0x1000ULL * (i + 1);
	*count = n;
	return NVML_SUCCESS;
}

/* nvmlEnableState_t: NVML_FEATURE_DISABLED 0, NVML_FEATURE_ENABLED 1 */
nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *pending)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!d->has_retire)
		return NVML_ERROR_NOT_SUPPORTED;
	*pending = (int)d->retired_pending;
	return NVML_SUCCESS;
}

typedef struct {
	unsigned long long referenceTime; /* us */
	unsigned long long violationTime; /* ns */
} nvmlViolationTime_t;

nvmlReturn_t nvmlDeviceGetViolationStatus(nvmlDevice_t d, int policy, nvmlViolationTime_t *v)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (policy < 0 || policy > 5)
		return NVML_ERROR_NOT_SUPPORTED; /* TOTAL_APP_CLOCKS, TOTAL_BASE_CLOCKS */
	if (d->violation_ns[policy] == NS)
		return NVML_ERROR_NOT_SUPPORTED;
	v->referenceTime = 1700000000000000ULL;
	v->violationTime = d->violation_ns[policy];
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *reasons)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*reasons = d->clocks_event_reasons;
	return r;
}

/* The name before driver 535; nvml-wrapper 0.13 calls this one. */
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *reasons)
{
	return nvmlDeviceGetCurrentClocksEventReasons(d, reasons);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj)
{
	nvmlReturn_t r = check(d);
	if (!r)
		*mj = d->energy_mj;
	return r;
}

/* Boards without NVLink answer NOT_SUPPORTED; links past the board's answer INVALID_ARGUMENT. */
#define check_link(d, link) check_link_call(d, link, __func__)

static nvmlReturn_t check_link_call(nvmlDevice_t d, unsigned link, const char *fn)
{
	nvmlReturn_t r = check_call(d, fn);
	if (r)
		return r;
	if (!d->has_nvlink)
		return NVML_ERROR_NOT_SUPPORTED;
	if (link >= FAKE_NVLINKS)
		return NVML_ERROR_INVALID_ARGUMENT;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t d, unsigned link, int *active)
{
	nvmlReturn_t r = check_link(d, link);
	if (!r)
		*active = d->nvlink_active[link];
	return r;
}

/* counter: nvmlNvLinkErrorCounter_t, DL_REPLAY 0, DL_RECOVERY 1, DL_CRC_FLIT 2, DL_CRC_DATA 3 */
nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t d, unsigned link, int counter,
					     unsigned long long *value)
{
	nvmlReturn_t r = check_link(d, link);
	if (r)
		return r;
	if (counter < 0 || counter > 3)
		return NVML_ERROR_NOT_SUPPORTED; /* DL_ECC_DATA: not on this board */
	*value = d->nvlink_errors[link][counter];
	return NVML_SUCCESS;
}

typedef union {
	double dVal;
	int siVal;
	unsigned uiVal;
	unsigned long ulVal;
	unsigned long long ullVal;
	long long sllVal;
	unsigned short usVal;
} nvmlValue_t;

typedef struct {
	unsigned long long timeStamp;
	nvmlValue_t sampleValue;
} nvmlSample_t;

/* type: NVML_GPU_UTILIZATION_SAMPLES 1, NVML_MEMORY_UTILIZATION_SAMPLES 2. The buffer gains
 * four samples (one every 1000 us) each time it is read; a read returns those newer than
 * `last_seen`, NOT_FOUND when there are none, and the count alone when `samples` is NULL. */
nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t d, int type, unsigned long long last_seen,
				  int *value_type, unsigned *count, nvmlSample_t *samples)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (type != 1 && type != 2)
		return NVML_ERROR_NOT_SUPPORTED;
	const unsigned *cycle = type == 1 ? d->util_gpu_cycle : d->util_mem_cycle;
	unsigned long long newest = d->sample_clock_us + 4000;
	unsigned n = last_seen >= newest ? 0 : (unsigned)((newest - last_seen) / 1000);
	if (n == 0)
		return NVML_ERROR_NOT_FOUND;
	if (!samples) {
		*count = n;
		return NVML_SUCCESS;
	}
	if (*count < n)
		n = *count;
	*value_type = 1; /* NVML_VALUE_TYPE_UNSIGNED_INT */
	for (unsigned i = 0; i < n; i++) {
		unsigned long long ts = newest - 1000ULL * (n - 1 - i);
		samples[i].timeStamp = ts;
		samples[i].sampleValue.ullVal = 0;
		samples[i].sampleValue.uiVal = cycle[(ts / 1000) % 4];
	}
	*count = n;
	/* Both sample types share the clock: advance it once per pair of reads. */
	if (type == 2)
		d->sample_clock_us = newest;
	return NVML_SUCCESS;
}

typedef struct {
	unsigned fieldId, scopeId;
	long long timestamp, latencyUsec;
	int valueType;
	nvmlReturn_t nvmlReturn;
	nvmlValue_t value;
} nvmlFieldValue_t;

/* NVML_FI_DEV_CLOCKS_EVENT_REASON_{SW_THERM,HW_THERM,HW_POWER_BRAKE}_SLOWDOWN (251-253, the
 * driver-535 numbering) and NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_{TX,RX} (138, 139; scopeId is
 * the link). Each value has its own return code; any other field is NOT_SUPPORTED. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	for (int i = 0; i < count; i++) {
		nvmlFieldValue_t *v = &values[i];
		v->timestamp = 1700000000000000LL;
		v->latencyUsec = 0;
		v->valueType = 3; /* NVML_VALUE_TYPE_UNSIGNED_LONG_LONG */
		v->nvmlReturn = NVML_SUCCESS;
		if (v->fieldId >= 251 && v->fieldId <= 253) {
			v->value.ullVal = d->throttle_field_ns[v->fieldId - 251];
		} else if (v->fieldId == 138 || v->fieldId == 139) {
			if (!d->has_nvlink || v->scopeId >= FAKE_NVLINKS)
				v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
			else
				v->value.ullVal = v->fieldId == 138 ? d->nvlink_tx_kib[v->scopeId]
								   : d->nvlink_rx_kib[v->scopeId];
		} else {
			v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
		}
	}
	return NVML_SUCCESS;
}

typedef struct {
	unsigned pid;
	unsigned long long usedGpuMemory;
	unsigned gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

/* A count below the processes' (or no buffer) answers INSUFFICIENT_SIZE with the count needed. */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *count,
						     nvmlProcessInfo_t *infos)
{
	nvmlReturn_t r = check(d);
	if (r)
		return r;
	if (!infos || *count < d->nprocs) {
		*count = d->nprocs;
		return d->nprocs ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
	}
	for (unsigned i = 0; i < d->nprocs; i++) {
		infos[i].pid = d->proc_pid[i];
		infos[i].usedGpuMemory = d->proc_bytes[i];
		infos[i].gpuInstanceId = 0xFFFFFFFFu;
		infos[i].computeInstanceId = 0xFFFFFFFFu;
	}
	*count = d->nprocs;
	return NVML_SUCCESS;
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
