"""Hardware profiles: one YAML per (device, power mode, runtime), validated by a pydantic schema.

Units live in the field names (``peak_bw_GBps``, ``fp16_tflops``, ``per_kernel_overhead_us``...).
GB and MB are decimal (1e9 / 1e6 bytes), as in datasheets. Every shipped profile is an
uncalibrated prior built from public specs (``calibrated: false``); its ``sources`` list cites
the keys of ``research/hardware.md`` and the URLs behind them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from autocompress import formats
from autocompress._io import read_yaml
from autocompress.errors import ProfileError

ENV_PROFILES_DIR = "AUTOCOMPRESS_HW_PROFILES"

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Efficiency = Annotated[float, Field(gt=0, le=1)]
# Efficiency keys: a registry format name (``Q4_K``, ``int4-g128-asym``...) for that format alone, or a
# class key every format of that width falls back to (w8a8: int8 x int8 GEMM).
CLASS_KEYS = ("fp32", "fp16", "int8", "int6", "int5", "int4", "int3", "int2", "w8a8")
DeviceClass = Literal["edge_gpu_soc", "discrete_gpu", "server_cpu", "client_cpu", "arm_sbc", "apple_soc", "mobile_soc"]


def _format_key(key: str) -> str:
    if key in CLASS_KEYS:
        return key
    try:
        return formats.get(key).name
    except formats.FormatError as exc:
        raise ValueError(f"{exc} (or a class key: {', '.join(CLASS_KEYS)})") from None


FormatKey = Annotated[str, AfterValidator(_format_key)]


def efficiency_keys(fmt: formats.Format | None, dense_bits: int = 16) -> tuple[str, ...]:
    """Give the efficiency keys a format is looked up by: its own name, then its class (``int4``, ``fp16``)."""
    if fmt is None:
        return ("fp32" if dense_bits == 32 else "fp16",)
    if fmt.is_float:
        return (fmt.name, "fp32" if fmt.bits == 32 else "fp16")
    return (fmt.name, f"int{min(fmt.bits, 8)}")


DEVICE_CLASSES: tuple[str, ...] = get_args(DeviceClass)
# Aliases that resolve to a shipped profile only when no profile in the folder claims them: a
# calibrated ``local.yaml`` written by ``autocompress hw calibrate`` takes ``cpu`` over.
FALLBACK_ALIASES: dict[str, str] = {"cpu": "x86-avx2-laptop"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Kernels(_Strict):
    """Which compressed formats the runtime executes with a fast kernel (none is assumed otherwise)."""

    # Bit-widths with a dequantise-in-kernel GEMV/GEMM. Other widths are stored and read as the
    # next listed width up (16 = plain fp16 when none is larger), so no speed-up is invented.
    weight_only_bits: tuple[Annotated[int, Field(ge=2, le=8)], ...] = (2, 3, 4, 5, 6, 8)
    int8_compute: bool = False  # W8A8 matmuls run on the int8 peak (needs int8_tops)
    sparse_2_4: bool = False  # 2:4 kernels exist: compressed 2:4 storage + sparse_2_4_speedup on compute
    sparse_2_4_speedup: float = Field(default=1.0, ge=1.0)
    unstructured_sparse_storage: bool = False  # runtime stores/reads unstructured-sparse weights (bitmap)
    sparse_runtime: str | None = None  # the runtime/library that does so (required with the flag above)
    # the runtime runs a linear as two factors (low-rank): graph runtimes (onnxruntime, torch) do;
    # llama.cpp, MLC and TensorRT-LLM build fixed model graphs from their own definitions and do not
    low_rank: bool = False

    @model_validator(mode="after")
    def _sparse_named(self) -> Kernels:
        if self.unstructured_sparse_storage and not self.sparse_runtime:
            raise ValueError("unstructured_sparse_storage needs sparse_runtime: name the runtime that stores it sparse")
        return self

    @property
    def int4_weight_only(self) -> bool:
        return 4 in self.weight_only_bits

    def stored_bits(self, bits: int) -> int:
        """Give the width a ``bits``-bit weight really occupies on this runtime (16 if no kernel fits)."""
        if bits >= 16:
            return 16
        return min((b for b in self.weight_only_bits if b >= bits), default=16)


class Anchor(_Strict):
    """A published end-to-end measurement the profile is checked against (hardware.md §1.3).

    ``format`` names the registry format the anchor's weights are in, where it is one; else
    ``bits`` / ``group_size`` / ``symmetric`` describe a generic grid of the same size."""

    model: str  # a key of ``autocompress.hardware.anchors.ANCHOR_MODELS``
    weights: str  # the published format label (q4_0, MLC q4f16_1, bf16...)
    format: FormatKey | None = None
    bits: int = Field(ge=2, le=16)
    group_size: int | None = None
    symmetric: bool = True
    sparsity_pattern: Literal["none", "2:4"] = "none"
    decode_tok_s: Positive
    context_tokens: int = Field(default=256, ge=1)
    runtime: str
    role: Literal["fit", "holdout"]  # fit: used to set the efficiency/overhead fields; holdout: only checked
    source: str


class CalibrationInfo(_Strict):
    """How a calibrated profile was measured (``autocompress hw calibrate``)."""

    date: str
    host: str
    threads: int = Field(ge=1)
    seconds: NonNegative
    samples: int = Field(ge=1)
    measurements: str  # file with the raw measurements, beside the profile
    fit_mape: NonNegative  # mean abs. % error of the fitted roofline on the micro-benchmarks
    tool: str


class HardwareProfile(_Strict):
    """A target device + power mode + runtime: peaks, efficiencies, overheads, kernels, power."""

    schema_version: Literal[1] = 1
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    aliases: tuple[str, ...] = ()
    display_name: str
    device_class: DeviceClass
    runtime: str
    # the storage formats this runtime runs on this device (registry names); None: every format the
    # registry lists for the runtime (``formats.for_runtime``). Dense weights are always possible.
    formats: tuple[FormatKey, ...] | None = None
    # the format the runtime's own recipes give the output head (llama.cpp: Q6_K, else by its fallback
    # for the row width); the uniform baselines store the embedding / head so. None: dense.
    head_format: FormatKey | None = None
    # what the runtime does to activations of quantized matmuls (compress/numerics.py): "exact" (none),
    # "onnxruntime-cpu" (int8 rounding per weight block / per tensor) or "llama.cpp-cpu" (each matmul's
    # input rounded to its weight type's vec_dot_type: Q8_0 / Q8_K / bf16 ...); the search evaluates with it
    numerics: Literal["exact", "onnxruntime-cpu", "llama.cpp-cpu"] = "exact"
    power_mode: str | None = None
    calibrated: bool
    sources: tuple[str, ...] = Field(min_length=1)
    notes: str | None = None

    # memory
    memory_GB: Positive
    usable_memory_GB: Positive
    runtime_overhead_MB: NonNegative
    peak_bw_GBps: Positive
    bw_efficiency: Efficiency
    bw_efficiency_by_format: dict[FormatKey, Efficiency] = Field(default_factory=dict)
    kv_cache_bits: Literal[8, 16, 32] = 16
    dense_bits: Literal[16, 32] = 16  # width of an uncompressed weight on this runtime (32: fp32 CPU runtimes)

    # compute
    fp16_tflops: Positive  # peak of the float path used for 16-bit and weight-only matmuls
    int8_tops: Positive | None = None
    compute_efficiency: Efficiency
    compute_efficiency_by_format: dict[FormatKey, Efficiency] = Field(default_factory=dict)
    kernels: Kernels = Kernels()

    # quantization metadata: one scale per group (+ one zero-point if asymmetric)
    scale_bits: int = Field(default=16, ge=1, le=32)
    zero_bits: int = Field(default=16, ge=1, le=32)

    # overheads
    per_kernel_overhead_us: NonNegative
    per_token_overhead_ms: NonNegative
    kernels_per_linear: int = Field(default=1, ge=1)
    # measured fixed cost of one linear in a format (all its kernels: e.g. dynamic int8 = quantize +
    # MatMulInteger + rescale); overrides kernels_per_linear x per_kernel_overhead_us
    linear_overhead_us_by_format: dict[FormatKey, NonNegative] = Field(default_factory=dict)
    kernels_per_block: int = Field(ge=0)  # non-linear kernels per block after fusion (norms, rotary, attention...)
    # a block's prefill work per prompt token beyond its matmuls' roofline and kernel launches (norms,
    # RoPE, softmax and the KV cache's writes over every token); measured by the local calibration
    prefill_block_us_per_token: NonNegative = 0.0
    alignment: int = Field(ge=1)
    misaligned_penalty: Efficiency  # throughput factor for a matmul whose dims are not multiples of alignment

    # power, for energy = active_W x busy time + idle_W x overhead time
    idle_W: Positive
    active_W: Positive
    # optional bottom-up split (hardware.md §3.1): energy = idle_W x t + bytes x pJ/B + flops x pJ/flop
    energy_pJ_per_byte: NonNegative | None = None
    energy_pJ_per_flop: NonNegative | None = None

    anchors: tuple[Anchor, ...] = ()
    calibration: CalibrationInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if self.usable_memory_GB > self.memory_GB:
            raise ValueError(f"usable_memory_GB ({self.usable_memory_GB}) exceeds memory_GB ({self.memory_GB})")
        if self.active_W < self.idle_W:
            raise ValueError(f"active_W ({self.active_W}) is below idle_W ({self.idle_W})")
        if self.kernels.int8_compute and self.int8_tops is None:
            raise ValueError("kernels.int8_compute is true but int8_tops is not set")
        if self.calibrated and self.calibration is None:
            raise ValueError("calibrated is true but there is no calibration block (run `autocompress hw calibrate`)")
        if (self.energy_pJ_per_byte is None) != (self.energy_pJ_per_flop is None):
            raise ValueError("energy_pJ_per_byte and energy_pJ_per_flop go together: set both or neither")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    @property
    def dense_format(self) -> str:
        return "fp32" if self.dense_bits == 32 else "fp16"

    @property
    def format_names(self) -> tuple[str, ...]:
        """Give the registry formats this profile's runtime runs (``formats``, else the runtime's own)."""
        if self.formats is not None:
            return tuple(self.formats)
        try:
            return tuple(f.name for f in formats.for_runtime(self.runtime))
        except formats.FormatError:  # a runtime the registry does not know: dense only
            return ()

    def runs(self, fmt: str) -> bool:
        """True when the runtime has a kernel for this registry format."""
        return fmt in self.format_names

    def bw_efficiency_for(self, *keys: str) -> float:
        """Give the bandwidth efficiency of the first key found (a format name, then its class key
        such as ``int4`` or ``fp16``), else the profile's default."""
        return _first(self.bw_efficiency_by_format, keys, self.bw_efficiency)

    def compute_efficiency_for(self, *keys: str) -> float:
        """Give the compute efficiency of the matmul path for the first key found (as above)."""
        return _first(self.compute_efficiency_by_format, keys, self.compute_efficiency)

    def linear_overhead_us_for(self, *keys: str) -> float:
        """Give the fixed cost (µs) of one linear stored in a format, all its kernels included."""
        return _first(self.linear_overhead_us_by_format, keys, self.kernels_per_linear * self.per_kernel_overhead_us)


def _first(table: dict[str, float], keys: tuple[str, ...], default: float) -> float:
    return next((table[k] for k in keys if k in table), default)


def profiles_dir() -> Path:
    """Give the folder holding the shipped profiles (``$AUTOCOMPRESS_HW_PROFILES`` overrides it)."""
    env = os.environ.get(ENV_PROFILES_DIR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "hw_profiles"


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return f"{source}: field {field!r}: {msg}{more}"


def profile_from_dict(data: object, source: str = "profile") -> HardwareProfile:
    """Give a validated profile; any problem is one ``ProfileError`` line naming source and field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_one_line(exc, source)) from None


def read_profile(path: str | Path) -> HardwareProfile:
    """Give the profile stored in one YAML file."""
    path = Path(path)
    data = read_yaml(path, ProfileError, "hardware profile file")
    if data is None:
        raise ProfileError(f"{path}: the file is empty")
    return profile_from_dict(data, str(path))


def list_profiles() -> list[HardwareProfile]:
    """Give every profile in ``profiles_dir()``, sorted by id; ids and aliases must be unique."""
    folder = profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"hardware profile folder not found: {folder} (set {ENV_PROFILES_DIR} to override)")
    profiles = [read_profile(p) for p in sorted(folder.glob("*.yaml"))]
    seen: dict[str, str] = {}
    for prof in profiles:
        for name in prof.names:
            if name in seen:
                raise ProfileError(f"{folder}: name '{name}' is used by both '{seen[name]}' and '{prof.id}'")
            seen[name] = prof.id
    return sorted(profiles, key=lambda p: p.id)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Give a profile by id, alias (``jetson``, ``rpi``, ``cpu``...) or path to a ``.yaml`` file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        return read_profile(path)
    profiles = list_profiles()
    for prof in profiles:
        if text in prof.names:
            return prof
    fallback = FALLBACK_ALIASES.get(text)
    for prof in profiles:
        if prof.id == fallback:
            return prof
    ids = ", ".join(p.id for p in profiles)
    aliases = ", ".join(dict.fromkeys([*(a for p in profiles for a in p.aliases), *FALLBACK_ALIASES]))
    raise ProfileError(f"unknown hardware profile '{text}'; available: {ids} (aliases: {aliases})")


def resolve_name(name: str) -> str:
    """Give the id a name resolves to, with how (``cpu`` -> the local calibrated profile or the x86 prior)."""
    prof = load_profile(name)
    if name in FALLBACK_ALIASES and prof.id == FALLBACK_ALIASES[name]:
        return f"{prof.id} (no calibrated local profile; run `autocompress hw calibrate --out hw_profiles/local.yaml`)"
    return prof.id if name == prof.id else f"{prof.id} (alias {name!r})"
