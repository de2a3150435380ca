/* The moments of a BN input in one read: bnfold's recalibration kernel (see bnfold/pytorch/recalibrate.py).
 *
 * For a float32 array of shape (samples, channels, positions), C-contiguous, it gives each row's (sample
 * and channel's) sum and M2 (sum of squared deviations from the row's own mean), in float64, and each
 * channel's mean and population variance over all its values (Chan's update over the samples), in float64
 * and in float32 for the normalization. The float64 results come as one record, laid out as bnfold keeps
 * a call's observation (recalibrate.py, `_Call`), so nothing is copied per call. Each row is read from
 * memory once: the second pass over it hits the cache. Given an output, it also writes the values
 * normalized by those statistics, as a BN in training mode does (the fast method's BN layers): one call
 * instead of the kernel and torch's eval-mode BN, whose dispatch cost as much as a small BN's work.
 *
 * Exact at any offset: a row is summed about its first value and squared about its own mean, in float
 * lanes flushed to double every BLOCK values, so rounding scales with the row's spread, not its size.
 * torch would need three passes (a sum, a subtraction written out, a norm) or its BN kernels' scalar loops.
 *
 * Built as an optional extension (pyproject.toml): without a C compiler bnfold uses those torch passes.
 * Python's own CFLAGS carry -fwrapv, which stops gcc vectorizing the lanes (six times slower): the build
 * turns it off again (-fno-wrapv); nothing here relies on signed overflow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 256
/* Rows of at most SHORT_ROW values are reduced GROUP at a time (see row_moments). */
#define SHORT_ROW 1024
#define GROUP 8
/* Below this many values a call is not worth a thread. */
#define VALUES_PER_THREAD (1 << 18)
#define MAX_THREADS 64

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORIZED
#endif

/* The double sum of a block's float lanes, as a tree: a chain of LANES dependent additions cost more than
   the block itself on short rows (a 4x4 feature map is one block). */
static inline __attribute__((always_inline)) double lanes_total(const float *lane) {
    double half[LANES / 2];
    for (int j = 0; j < LANES / 2; j++) half[j] = (double)lane[j] + (double)lane[j + LANES / 2];
    for (int width = LANES / 4; width >= 1; width /= 2)
        for (int j = 0; j < width; j++) half[j] += half[j + width];
    return half[0];
}

/* The sum of (row[i] - centre), or of its squares: float lanes of at most BLOCK / LANES values each,
   flushed to double. Inlined with `square` constant, so each loop is vectorized. */
static inline __attribute__((always_inline)) double lane_sum(const float *row, int64_t n, float centre, int square) {
    double total = 0.0;
    int64_t i = 0;
    while (n - i >= LANES) {
        float lane[LANES] = {0};
        int64_t end = n - i >= BLOCK ? i + BLOCK : n - (n - i) % LANES;
        for (; i < end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float d = row[i + j] - centre;
                lane[j] += square ? d * d : d;
            }
        total += lanes_total(lane);
    }
    for (; i < n; i++) {
        double d = (double)row[i] - centre;
        total += square ? d * d : d;
    }
    return total;
}

/* One call's arrays: the values (samples, channels, positions); the float64 record (each channel's mean,
   its population variance, each row's sum, each row's M2) and float32 statistics (means, variances) it
   fills; and, to normalize as well, the output and the BN's weight and bias (NULL: 1 and 0) and eps. */
typedef struct {
    const float *values;
    int64_t samples, channels, positions;
    double *record;
    float *statistics;
    float *output;
    const float *weight, *bias;
    double eps;
} Call;

typedef struct {
    const Call *call;
    int64_t first, last; /* channels */
    int failed;          /* out of memory */
} Share;

/* The sums and M2 of `count` rows that follow each other in memory (one sample's channels), into `sums`
   and `m2`. First all their sums, then all their M2: a row's two passes are one chain of dependent
   additions, and a 4x4 feature map is little else; rows of a group are independent, so the processor
   overlaps them (24 ns a row of 16 values alone, 14 in groups of 8). */
static inline __attribute__((always_inline)) void row_moments(const float *rows, int64_t positions, int64_t count,
                                                              double *sums, double *m2) {
    double n = (double)positions, inv_n = 1.0 / n;
    for (int64_t k = 0; k < count; k++) {
        const float *row = rows + k * positions;
        sums[k] = lane_sum(row, positions, row[0], 0) + n * row[0];
    }
    for (int64_t k = 0; k < count; k++) {
        const float *row = rows + k * positions;
        double mean = sums[k] * inv_n;
        float centre = (float)mean;
        double off = mean - (double)centre; /* the centre's rounding, taken out exactly: */
        /* sum (x - c)^2 = M2 + n (mean - c)^2 */
        double deviations = lane_sum(row, positions, centre, 1) - n * off * off;
        m2[k] = deviations < 0.0 ? 0.0 : deviations;
    }
}

/* The share's rows in memory order, sample by sample, for their moments; then each channel's mean and
   variance (Chan's update over the samples); then, to normalize, the values scaled and shifted in memory
   order again. A channel's rows lie a power of two apart in most models: read or written channel by
   channel, they evicted each other from the cache (reduced so, 7% slower on a MobileNet's layers;
   normalized so, 1.6 times slower than an eval-mode BN on 32x64x32x32). Vectorized
   as a whole, the lanes inlined: a call per row through the clones' dispatch cost as much as a short row. */
VECTORIZED static void *channel_moments(void *arg) {
    Share *share = (Share *)arg;
    const Call *call = share->call;
    int64_t samples = call->samples, channels = call->channels, positions = call->positions;
    int64_t group = positions <= SHORT_ROW ? GROUP : 1; /* long rows one at a time, each in the cache for its M2 */
    double *mean = call->record, *var = mean + channels, *sums = var + channels, *m2 = sums + samples * channels;
    double n = (double)positions;
    for (int64_t s = 0; s < samples; s++)
        for (int64_t c = share->first; c < share->last; c += group) {
            int64_t count = share->last - c < group ? share->last - c : group;
            row_moments(call->values + (s * channels + c) * positions, positions, count, sums + s * channels + c,
                        m2 + s * channels + c);
        }
    for (int64_t c = share->first; c < share->last; c++) {
        double total = 0.0, within = 0.0, between = 0.0;
        for (int64_t s = 0; s < samples; s++) {
            total += sums[s * channels + c];
            within += m2[s * channels + c];
        }
        double centre = total / (n * (double)samples);
        for (int64_t s = 0; s < samples; s++) {
            double d = sums[s * channels + c] / n - centre; /* divided: a dead channel's is exactly 0 */
            between += d * d;
        }
        mean[c] = centre;
        var[c] = (within + n * between) / (n * (double)samples);
        call->statistics[c] = (float)mean[c];
        call->statistics[channels + c] = (float)var[c];
    }
    if (call->output) {
        /* y = x * alpha + beta in float32, alpha and beta from the float32 statistics in double, once per
           channel (a square root and a division per row cost 8 us on a 32x32x4x4 input) */
        int64_t count = share->last - share->first;
        float *alpha = malloc(2 * count * sizeof(float)), *beta = alpha + count;
        for (int64_t c = share->first; alpha && c < share->last; c++) {
            double variance = call->statistics[channels + c];
            double scale = (call->weight ? call->weight[c] : 1.0) / sqrt(variance + call->eps);
            alpha[c - share->first] = (float)scale;
            beta[c - share->first] = (float)((call->bias ? call->bias[c] : 0.0) - (double)call->statistics[c] * scale);
        }
        for (int64_t s = 0; alpha && s < samples; s++)
            for (int64_t c = share->first; c < share->last; c++) {
                const float *row = call->values + (s * channels + c) * positions;
                float *out = call->output + (s * channels + c) * positions;
                float a = alpha[c - share->first], b = beta[c - share->first];
                for (int64_t i = 0; i < positions; i++) out[i] = row[i] * a + b;
            }
        if (!alpha) share->failed = 1;
        free(alpha);
    }
    return NULL;
}

/* Channels split over up to `threads` threads (the caller's one among them); 0, or -1 out of memory. */
static int all_channels(const Call *call, int threads) {
    int64_t wanted = call->samples * call->channels * call->positions / VALUES_PER_THREAD;
    if (threads > wanted) threads = (int)(wanted > 1 ? wanted : 1);
    if (threads > call->channels) threads = (int)call->channels;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    Share shares[MAX_THREADS];
    pthread_t workers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        shares[t] = (Share){call, call->channels * t / threads, call->channels * (t + 1) / threads, 0};
        if (t > 0) started[t] = pthread_create(&workers[t], NULL, channel_moments, &shares[t]) == 0;
    }
    channel_moments(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(workers[t], NULL);
        else channel_moments(&shares[t]); /* no thread to be had: this one does the share */
    }
    for (int t = 0; t < threads; t++)
        if (shares[t].failed) return -1;
    return 0;
}

static int sized(const Py_buffer *buffer, int64_t items, Py_ssize_t itemsize, const char *name) {
    if (buffer->len != (Py_ssize_t)(items * itemsize) || !PyBuffer_IsContiguous(buffer, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld contiguous items of %zd bytes", name,
                     (long long)items, itemsize);
        return 0;
    }
    return 1;
}

/* An optional float32 buffer (None: none), `items` long. */
static int optional(PyObject *object, Py_buffer *buffer, int writable, int64_t items, const char *name) {
    buffer->obj = NULL;
    if (object == Py_None) return 1;
    if (PyObject_GetBuffer(object, buffer, writable ? PyBUF_WRITABLE | PyBUF_ND : PyBUF_ND) < 0) return 0;
    return sized(buffer, items, sizeof(float), name);
}

static PyObject *batch_moments(PyObject *self, PyObject *args) {
    Py_buffer values, record, statistics, output, weight, bias;
    PyObject *output_object = Py_None, *weight_object = Py_None, *bias_object = Py_None;
    long long samples, channels, positions;
    int threads;
    double eps = 0.0;
    if (!PyArg_ParseTuple(args, "y*LLLw*w*i|OOOd", &values, &samples, &channels, &positions, &record, &statistics,
                          &threads, &output_object, &weight_object, &bias_object, &eps))
        return NULL;
    output.obj = weight.obj = bias.obj = NULL;
    PyObject *result = NULL;
    int64_t rows = samples * channels;
    if (samples < 1 || channels < 1 || positions < 1) {
        PyErr_SetString(PyExc_ValueError, "samples, channels and positions must be positive");
    } else if (sized(&values, rows * positions, sizeof(float), "values")
               && sized(&record, 2 * (channels + rows), sizeof(double), "record")
               && sized(&statistics, 2 * channels, sizeof(float), "statistics")
               && optional(output_object, &output, 1, rows * positions, "output")
               && optional(weight_object, &weight, 0, channels, "weight")
               && optional(bias_object, &bias, 0, channels, "bias")) {
        Call call = {(const float *)values.buf, samples, channels, positions, (double *)record.buf,
                     (float *)statistics.buf, output.obj ? (float *)output.buf : NULL,
                     weight.obj ? (const float *)weight.buf : NULL, bias.obj ? (const float *)bias.buf : NULL, eps};
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = all_channels(&call, threads);
        Py_END_ALLOW_THREADS
        result = status == 0 ? Py_NewRef(Py_None) : PyErr_NoMemory();
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&record);
    PyBuffer_Release(&statistics);
    if (output.obj) PyBuffer_Release(&output);
    if (weight.obj) PyBuffer_Release(&weight);
    if (bias.obj) PyBuffer_Release(&bias);
    return result;
}

static PyMethodDef methods[] = {
    {"batch_moments", batch_moments, METH_VARARGS,
     "batch_moments(values, samples, channels, positions, record, statistics, threads, output=None, weight=None, "
     "bias=None, eps=0.0): into the float64 record each channel's mean, then its population variance, then "
     "each row's sum (samples x channels), then each row's M2; into the float32 statistics the means, then "
     "the variances; into output, if given, the values normalized by them (scaled by weight, shifted by bias)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_moments", NULL, -1, methods};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
