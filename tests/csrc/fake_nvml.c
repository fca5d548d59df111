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
	initialized = 1;
	log_line("init");
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void)
{
	initialized = 0;
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
