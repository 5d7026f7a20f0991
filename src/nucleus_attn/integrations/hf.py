"""Sparse decode for a loaded Hugging Face transformers model, through its attention registry.

:func:`enable` registers one attention function and its mask function with transformers
(``AttentionInterface`` / ``AttentionMaskInterface``) and switches the model to it with
``model.set_attn_implementation``; no model code is copied or patched. The function:

- runs prefill (``q_len > 1``) densely with transformers' own SDPA attention;
- runs each decode step (``q_len == 1``) of each sparse layer through
  :func:`nucleus_attn.decode_step`, with the method's metadata kept per layer;
- runs the first ``dense_layers`` layers, every sliding-window layer and, under the
  ``dense`` method, every layer densely: sliding windows with transformers' SDPA and its
  window mask (exact window semantics), unpadded decode with SDPA, GQA and no mask, padded
  or static caches with our range kernel over the valid keys (no mask materialised, KV
  heads not repeated). That is the fastest dense baseline.

Which keys exist per sequence (left padding before them, the unwritten part of a static
cache after them) is read from the boolean decode mask of transformers' ``sdpa_mask``
(registered under our name: without it, padded batches would get no mask at all) as a
:class:`~nucleus_attn.KeySpan`, on the device.

Under ``torch.compile`` (``enable(..., compile=True)``: a static cache and decode steps
compiled with CUDA graphs) the function is one opaque custom op per layer
(:mod:`.compiled`): inductor fuses the rest of the step, and the op runs this module's
eager code when the graph is recorded.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from ..decode import decode_step, new_state
from ..methods import MethodConfig, MethodState, describe, make_config
from ..span import KeySpan
from . import compiled
from .stats import LayerStats, print_summary, summarize
from .tp import check_tensor_parallel, tp_world_size

#: Name under which the attention and mask functions are registered with transformers.
ATTN_NAME = "nucleus_attn"
#: ``config.model_type`` values tested end to end (greedy equality at p=1, padded batches).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
#: ``config.layer_types`` entries handled: full attention (sparse) and sliding (dense).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

# attention module -> the handle that owns it; a module missing here (the model was
# disabled, or another model was switched to our name by hand) gets plain SDPA
_OWNER: weakref.WeakKeyDictionary[nn.Module, SparseDecodeHandle] = weakref.WeakKeyDictionary()
_ENABLED: weakref.WeakKeyDictionary[nn.Module, SparseDecodeHandle] = weakref.WeakKeyDictionary()


def nucleus_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered as ``"nucleus_attn"`` (transformers' signature).

    ``query`` is ``[B, Hq, q_len, d]``; ``key``/``value`` are the whole cache after this
    step's append, ``[B, Hkv, N, d]``. Returns ``([B, q_len, Hq, d], None)``.
    """
    if torch.compiler.is_compiling() and hasattr(module, compiled.KEY_ATTR):
        # traced by dynamo: one opaque op, which runs the code below when the graph runs
        return compiled.attend(module, query, key, value, attention_mask, dropout, scaling,
                               kwargs)
    handle = _OWNER.get(module)
    if handle is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return handle._attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)


@dataclass
class _Layer:
    """One attention layer: whether it runs the method, and the method's metadata."""

    stats: LayerStats
    state: MethodState | None = None
    built: bool = False  # state built for the current sequence (None is a valid state)
    n: int = 0  # cache positions the state covers
    batch: int = 0
    prefill_n: int = 0  # cache length at the prefill the next build follows (0: none)

    def forget(self) -> None:
        self.state, self.built, self.n, self.batch = None, False, 0, 0
        self.prefill_n = 0


class SparseDecodeHandle:
    """Sparse decode switched on for one model; also a context manager.

    Returned by :func:`enable`. :meth:`disable` (or leaving the ``with`` block) restores
    the model's previous attention implementation and drops the method's metadata.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        The model.
    config : MethodConfig
        The method and its parameters.
    dense_layers : int
        Number of first layers kept dense.
    diagnostics : bool
        Whether the exact kept attention mass is measured at each step.
    stats : bool
        Whether kept counts are recorded at each step (may be switched at any time).
    enabled : bool
        False once :meth:`disable` ran.
    """

    def __init__(self, model: PreTrainedModel, config: MethodConfig, dense_layers: int,
                 diagnostics: bool, stats: bool, previous: str, layers: dict[int, _Layer],
                 modules: list[nn.Module]) -> None:
        self.model = model
        self.config = config
        self.dense_layers = dense_layers
        self.diagnostics = diagnostics
        self._stats = stats
        self.enabled = True
        self._previous = previous
        self._layers = layers
        self._modules = modules
        self._module_of = {m.layer_idx: m for m in modules}
        self._generation_config: dict[str, Any] | None = None  # what enable() replaced
        self._key = compiled.register(self, modules)
        # the key span of the current step, shared by the layers: (layer, a weak reference
        # to the mask, B, N, device); a strong one would keep the step's mask alive
        self._span_key: tuple[Any, ...] | None = None
        self._span: tuple[KeySpan, bool] | None = None
        self._zeros: Tensor | None = None  # [B] starts of unpadded steps, reused
        # compiled steps: [B] starts, ends and lengths, made outside any step and written
        # in place by each (see _compiled_span)
        self._span_buffers: tuple[Tensor, Tensor, Tensor] | None = None
        self.compiled = False  # decode steps run compiled (see enable(compile=...))
        self.compile_mode = False  # made by enable(compile=...)
        self.graph_resets = 0  # times recorded CUDA graphs were dropped (new state shapes)

    @property
    def stats(self) -> bool:
        """Whether kept counts are recorded at each step (may be switched at any time)."""
        return self._stats

    @stats.setter
    def stats(self, value: bool) -> None:
        if bool(value) != self._stats and self.compiled:
            _reset_graphs()  # recorded CUDA graphs would keep (not) recording
        self._stats = bool(value)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return (f"SparseDecodeHandle({describe(self.config)}, "
                f"dense_layers={self.dense_layers}, {state})")

    # --- lifecycle -----------------------------------------------------------------------

    def disable(self) -> None:
        """Restore the previous attention implementation and drop all method state.

        Calling it again is a no-op. Statistics stay readable with :meth:`summary`.
        """
        if not self.enabled:
            return
        self.enabled = False
        for module in self._modules:
            _OWNER.pop(module, None)
        _ENABLED.pop(self.model, None)
        compiled.unregister(self._key, self)
        _reset_graphs()
        self.model.set_attn_implementation(self._previous)
        if self._generation_config is not None:
            _restore_generation(self.model, self._generation_config)
            self._generation_config = None
        for layer in self._layers.values():
            layer.forget()
        self._span_key = self._span = self._zeros = self._span_buffers = None

    def __enter__(self) -> SparseDecodeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # --- statistics ----------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget the statistics gathered so far (metadata and the model are untouched)."""
        for layer in self._layers.values():
            layer.stats.reset()

    def summary(self) -> dict[str, Any]:
        """Kept tokens and kept attention mass since :func:`enable` or :meth:`reset_stats`.

        Returns
        -------
        dict
            ``method``, ``spec`` (``name:key=value`` of the non-default parameters),
            ``params``, ``dense_layers``, ``diagnostics``; ``decode_rows`` (decode steps
            times batch rows); ``mean_kept_fraction`` and ``mean_mass`` over all layers,
            dense layers (the first ``dense_layers`` and sliding-window ones) counting as
            kept fraction 1 and mass 1; ``std_kept_fraction`` (spread over layers, heads,
            steps and rows); ``sparse_kept_fraction`` and ``sparse_mass`` over the layers
            that run the method; ``mean_kept_tokens`` and ``mean_context_tokens`` (sparse
            layers, per KV head); ``per_layer``: one dict per layer with the same keys
            plus ``layer``, ``kind`` (``sparse``/``dense``/``sliding``), ``dense``,
            ``kept_fraction_per_head`` ([Hkv]) and ``mass_per_head`` ([Hq]). Masses are
            None unless ``diagnostics=True``; means are None before any decode step.
        """
        header = {
            "method": self.config.name,
            "spec": describe(self.config),
            "params": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "dense_layers": self.dense_layers,
            "diagnostics": self.diagnostics,
        }
        return summarize([self._layers[i].stats for i in sorted(self._layers)], header)

    def print_summary(self, console: Any = None) -> None:
        """Print :meth:`summary` as a rich table (see :func:`~.stats.print_summary`)."""
        print_summary(self.summary(), console)

    # --- warm-up --------------------------------------------------------------------------

    def warmup(self, prompt_tokens: int | Sequence[int] = 2048, *, new_tokens: int = 32,
               batch: int = 1, padded: bool = False, **generate_kwargs: Any) -> dict[str, Any]:
        """Compile ahead: a throwaway generation of each request shape, so that the first
        real request pays neither kernel compilation nor (with ``compile=True``) graph
        compilation and recording.

        Runs ``model.generate`` on random token ids (greedy, exactly ``new_tokens`` new
        tokens) for each prompt length, then forgets the statistics it produced. Every
        Triton kernel a request uses is compiled for the specialisations the request will
        meet: the state build at the prompt length, and each decode kernel over
        ``new_tokens >= 16`` steps (Triton specialises integer arguments on divisibility by
        16, so the cache length's residue mod 16 matters until all 16 have been seen).
        Requests of other prompt lengths may still compile a few kernels once (kernels
        whose launch parameters depend on the length: see ``nucleus-attn bench host``).

        Parameters
        ----------
        prompt_tokens : int or sequence of int
            Prompt length(s) to warm up (default 2048). With ``compile=True`` warm up the
            longest request (prompt + ``new_tokens``): transformers (>= 5.24) sizes a
            generation's static cache for the longest one so far (or
            ``generation_config.max_cache_len``), so shorter requests then reuse the
            compiled graph (its CUDA graphs are recorded again for the new cache, a few
            steps); a longer one compiles again.
        new_tokens : int
            Decode steps per warm-up generation (default 32, at least 1).
        batch : int
            Rows per generation (default 1).
        padded : bool
            Left-pad the last row by one token (batch >= 2): warms up the masked paths
            that left-padded batches take.
        **generate_kwargs
            Passed to ``model.generate`` (e.g. ``cache_implementation="static"``); use
            the same options as the requests. Run it in the same grad mode as the
            requests too (compiled graphs are specialised on it).

        Returns
        -------
        dict
            ``seconds`` (total), and ``runs``: per prompt length ``prompt_tokens`` and
            ``seconds``.

        Examples
        --------
        >>> handle = na.enable(model, "twilight", compile=True)  # doctest: +SKIP
        >>> handle.warmup(prompt_tokens=32768, new_tokens=256)  # doctest: +SKIP
        """
        import time

        lengths = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
        for name, value in (("new_tokens", new_tokens), ("batch", batch),
                            *(("prompt_tokens", n) for n in lengths)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"warmup: {name}={value!r} must be an int >= 1")
        if padded and batch < 2:
            raise ValueError("warmup: padded=True needs batch >= 2 (the last row is padded)")
        if not self.enabled:
            raise ValueError("warmup: this handle was disabled; call enable() again")
        model = self.model
        vocab = model.config.vocab_size
        gen = model.generation_config
        pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        pad = 0 if pad is None else int(pad)
        g = torch.Generator().manual_seed(0)
        runs, start = [], time.perf_counter()
        for n in lengths:
            ids = torch.randint(0, vocab, (batch, n), generator=g).to(model.device)
            mask = torch.ones_like(ids)
            if padded:
                ids[-1, 0], mask[-1, 0] = pad, 0
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=pad, **generate_kwargs)
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            runs.append({"prompt_tokens": n, "seconds": time.perf_counter() - t0})
        self.reset_stats()
        return {"seconds": time.perf_counter() - start, "runs": runs}

    # --- the attention step ----------------------------------------------------------------

    def _attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                mask: Tensor | None, dropout: float, scaling: float | None,
                kwargs: dict[str, Any]) -> tuple[Tensor, None]:
        layer = self._layers[module.layer_idx]
        if kwargs.get("softcap") is not None:
            raise ValueError(
                f"nucleus_attn: layer {module.layer_idx} soft-caps its attention logits, "
                "which SDPA and the sparse methods do not support; disable sparse decode "
                "for this model"
            )
        q_len, n = query.shape[2], key.shape[2]
        windowed = kwargs.get("sliding_window") is not None
        if windowed and layer.stats.kind == "sparse":
            layer.stats.kind = "sliding"
        if q_len > 1 or module.training:
            # prefill (or chunked prefill, or training): transformers' SDPA; the method's
            # metadata is rebuilt from the whole cache at the next decode step, or here
            # (into the same buffers) when decode steps are compiled and replayed as
            # graphs, which run none of this Python
            out = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                         scaling=scaling, **kwargs)
            found = None
            if self.compiled and not module.training:
                self._prepare_compiled_steps(layer, query, key)
                if not layer.stats.dense:
                    found = self._prefill_span(module, mask, query.shape[0], n, q_len,
                                               key.device, kwargs.get("position_ids"))
            if found is None:
                layer.forget()
                layer.prefill_n = n
            else:
                span, padded = found  # a copy: the step buffers are rewritten by each step
                span = KeySpan(span.starts.clone(), span.ends.clone(), span.n)
                self._build(layer, key, mask, span, padded, in_place=True)
            return out
        if layer.stats.dense:
            if self.stats:
                layer.stats.add_dense(query.shape[0])
            if mask is None or windowed:
                # no padding: SDPA with GQA and no mask (flash / cuDNN); a sliding window:
                # SDPA with transformers' window mask
                return sdpa_attention_forward(module, query, key, value, mask,
                                              dropout=dropout, scaling=scaling, **kwargs)
            # padded or static cache: exact attention over the valid range, no mask built
            span, _ = self._key_span(module, mask, query.shape[0], n, key.device)
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            out = ops.dense_attention(query[:, :, 0], key, value, span, scaling)
            return out[:, None], None
        return self._sparse_step(layer, module, query, key, value, mask, scaling)

    def _sparse_step(self, layer: _Layer, module: nn.Module, query: Tensor, key: Tensor,
                     value: Tensor, mask: Tensor | None,
                     scaling: float | None) -> tuple[Tensor, None]:
        b, _, _, d = query.shape
        n = key.shape[2]
        span, padded = self._key_span(module, mask, b, n, key.device)
        p, covered = layer.prefill_n, False
        if not layer.built and p and n in (p, p + 1):
            # the first step after a prefill: build from the prefill's keys, then take in
            # this step's token below, as every later one (what a build at the prefill
            # gives: eager and compiled steps keep the same metadata)
            before = KeySpan(span.starts, span.ends - 1, p)
            self._build(layer, key[:, :, :p] if n > p else key, mask, before, padded,
                        check=span)
        elif not layer.built or layer.batch != b or n < layer.n:
            # a new sequence without a prefill seen (or a cache that was cropped or
            # reordered): build from all of it
            self._build(layer, key, mask, span, padded)
            covered = True
        if layer.state is not None and not covered:
            if n > layer.n:  # a growing cache: the appended positions
                layer.state.extend(key, span)
            else:  # a static cache: the token written at span.ends - 1
                layer.state.refresh(key, span)
        layer.n, layer.batch = n, b
        if scaling is None:
            scaling = getattr(module, "scaling", d**-0.5)
        q = query[:, :, 0].contiguous()  # [B, Hq, d]
        out, info = decode_step(q, key, value, self.config, layer.state, span, scaling,
                                padded=padded, diagnostics=self.diagnostics)
        if self.stats:
            layer.stats.add(info)
        return out[:, None], None

    def _build(self, layer: _Layer, key: Tensor, mask: Tensor | None, span: KeySpan,
               padded: bool, in_place: bool = False, check: KeySpan | None = None) -> None:
        """Build the layer's metadata from the whole cache ``key`` ``[B, Hkv, N, d]``.

        With ``in_place`` the new metadata is copied into the previous one's tensors when
        every shape and host-side value agrees, so that decode steps captured in CUDA graphs
        (which hold the old addresses) read it; otherwise the captured graphs are dropped
        (:func:`_reset_graphs`) and recorded again at the next step. ``check`` is the span
        the mask describes, when it is not ``span`` (default: ``span``).
        """
        if padded and mask is not None:
            _check_one_block(mask, check or span)
        fresh = new_state(self.config, key, span)
        old = layer.state
        if in_place and old is not None and layer.built:
            if not _copy_into(old, fresh):
                layer.state = fresh
                _reset_graphs()
                self.graph_resets += 1
        else:
            layer.state = fresh
        layer.built, layer.prefill_n = True, 0
        layer.n, layer.batch = key.shape[2], key.shape[0]

    def _prefill_span(self, module: nn.Module, mask: Tensor | None, b: int, n: int,
                      q_len: int, device: torch.device,
                      position_ids: Tensor | None) -> tuple[KeySpan, bool] | None:
        """The keys a prefill's last token sees (those the next decode step's metadata is
        built from), or None when they cannot be told (then the first decode step builds)."""
        if mask is not None:  # its last query row
            return self._key_span(module, mask, b, n, device)
        if n == q_len:  # no past tokens, no padding
            return KeySpan.full(b, n, device), False
        if isinstance(position_ids, Tensor) and position_ids.dim() == 2:
            # a static cache, no padding (the mask was skipped: SDPA runs causal): the
            # first position_ids[:, -1] + 1 positions hold keys
            ends = position_ids[:, -1].to(device=device, dtype=torch.int64).expand(b) + 1
            return KeySpan(torch.zeros_like(ends), ends, n), True
        return None

    def _key_span(self, module: nn.Module, mask: Tensor | None, b: int, n: int,
                  device: torch.device) -> tuple[KeySpan, bool]:
        """The valid keys of this step and whether any position is masked.

        Computed at the first layer of each decode step (a layer index that does not grow
        starts a new step) and shared by the others; a mask updated in place between steps
        is therefore read again.
        """
        idx = module.layer_idx
        cached = self._span_key
        if (cached is not None and idx > cached[0] and cached[1]() is mask
                and cached[2:] == (b, n, device)):
            self._span_key = (idx, *cached[1:])
            return self._span  # type: ignore[return-value]
        self._span_key = (idx, _weak(mask), b, n, device)
        if self.compiled:
            self._span = self._compiled_span(mask, b, n, device)
            return self._span
        if mask is None:
            # no padding: starts are zeros (kept from step to step), ends are n
            zeros = self._zeros
            if zeros is None or zeros.shape[0] != b or zeros.device != device:
                zeros = self._zeros = _persistent(torch.zeros, b, dtype=torch.int64,
                                                  device=device)
            span = (KeySpan(zeros, torch.full((b,), n, dtype=torch.int64, device=device), n),
                    False)
        else:
            valid = _valid_keys(mask, b, n).to(torch.int8)
            starts = valid.argmax(-1)
            ends = n - valid.flip(-1).argmax(-1)
            span = (KeySpan(starts, ends, n), True)
        self._span = span
        return span

    def _compiled_span(self, mask: Tensor | None, b: int, n: int,
                       device: torch.device) -> tuple[KeySpan, bool]:
        """:meth:`_key_span` of a compiled step, written into the handle's step buffers.

        ``torch.compile(mode="reduce-overhead")`` runs every compiled step (its warm-up
        runs too) inside a private CUDA memory pool and refuses any allocation made there
        that outlives the step without being one of its outputs; the span shared by the
        layers (and cached until the next step) therefore lives in buffers made at the
        prefill (:meth:`_prepare_compiled_steps`), and each step only writes into them.
        """
        starts, ends, lengths = self._step_buffers(b, device)
        if mask is None:
            starts.zero_()
            ends.fill_(n)
        else:
            valid = _valid_keys(mask, b, n).to(torch.int8)
            starts.copy_(valid.argmax(-1))
            torch.sub(n, valid.flip(-1).argmax(-1), out=ends)
        torch.sub(ends, starts, out=lengths)
        span = KeySpan(starts, ends, n)
        span.__dict__["lengths"] = lengths  # the cached property, in its buffer
        return span, mask is not None

    def _prepare_compiled_steps(self, layer: _Layer, query: Tensor, key: Tensor) -> None:
        """At a prefill (eager), make what the compiled decode steps after it write into:
        the step's key-span buffers and the layer's statistics buffers (see
        :meth:`_compiled_span`)."""
        b = query.shape[0]
        self._step_buffers(b, key.device)
        if self.stats and not layer.stats.dense:
            layer.stats.prepare(b, key.shape[1], query.shape[1] if self.diagnostics else None,
                                key.device)

    def _step_buffers(self, b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The ``[B]`` int64 starts, ends and lengths buffers of compiled steps."""
        buffers = self._span_buffers
        if buffers is None or buffers[0].shape[0] != b or buffers[0].device != device:
            made = [_persistent(torch.empty, b, dtype=torch.int64, device=device)
                    for _ in range(3)]
            buffers = self._span_buffers = (made[0], made[1], made[2])
        return buffers


def _weak(t: Tensor | None) -> Callable[[], Tensor | None]:
    """A weak reference to ``t`` (None: a callable giving None)."""
    return (lambda: None) if t is None else weakref.ref(t)


def _persistent(make: Any, *shape: int, **kw: Any) -> Tensor:
    """A tensor that steps inside and outside ``torch.inference_mode`` can both use."""
    with torch.inference_mode(False):
        return make(*shape, **kw)


def _copy_into(old: Any, new: Any) -> bool:
    """Copy method state ``new`` into ``old`` (tensors in place, recursively through
    dataclasses); False, leaving ``old`` partly written, when a tensor's shape, dtype or
    device or a host-side value (page counts, the clusters' size bound...) differs. Fields
    that a state class names in ``HOST_COUNTERS`` (counts no kernel reads) take the new
    value instead of being compared."""
    if isinstance(old, Tensor):
        if not isinstance(new, Tensor) or (old.shape, old.dtype, old.device) != (
                new.shape, new.dtype, new.device):
            return False
        old.copy_(new)
        return True
    if dataclasses.is_dataclass(old) and not isinstance(old, type):
        if type(old) is not type(new):
            return False
        counters = getattr(type(old), "HOST_COUNTERS", ())
        for f in fields(old):
            a, b = getattr(old, f.name), getattr(new, f.name)
            if f.name in counters:  # host-side counts no kernel reads: the new one's
                setattr(old, f.name, b)
                continue
            if isinstance(a, Tensor) or (dataclasses.is_dataclass(a) and not isinstance(a, type)
                                         and not type(a).__dataclass_params__.frozen):
                if not _copy_into(a, b):
                    return False
            elif a != b:
                return False
        return True
    return bool(old == new)


def _reset_graphs() -> None:
    """Drop the CUDA graphs that compiled steps recorded (``enable(compile=...)``:
    ``torch.compile(mode="reduce-overhead")``); the next step compiles and records again.

    Needed whenever what our attention op does changes behind the compiled graph (another
    method or handle, statistics switched, method state replaced): a replay runs the
    kernels recorded, with the addresses recorded, and no Python. A compiled function's
    graphs cannot be dropped alone (a function whose cudagraph tree was shut down fails:
    "Running CUDAGraph after shutdown"), so this is ``torch.compiler.reset()``: every
    compiled function of the process compiles again at its next call. Nothing is reset
    unless compiled steps ran on a GPU since the last reset.
    """
    if compiled.take_recorded():
        torch.compiler.reset()


def _valid_keys(mask: Tensor, b: int, n: int) -> Tensor:
    """``[B, N]`` bool: the keys the decode query may attend to, from a 4D mask."""
    row = mask[:, 0, -1, :n]
    if row.dtype != torch.bool:  # an additive float mask: 0 where allowed
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(b, n)


def _check_one_block(mask: Tensor, span: KeySpan) -> None:
    """Raise unless each sequence's valid keys are one block ``[starts, ends)``: left
    padding before it, the unwritten part of a static cache after it.

    One host sync, at the first decode step of each sequence.
    """
    valid = _valid_keys(mask, span.starts.shape[0], span.n)
    if not bool((valid == span.valid_mask()).all()):
        raise ValueError(
            "nucleus_attn: the decode attention mask has masked positions between valid "
            "keys (right padding or a custom attention mask); sparse decode needs "
            "left-padded batches (tokenizer.padding_side = 'left')"
        )


# --- enable ----------------------------------------------------------------------------------

def _check_model(model: Any) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"enable() needs a loaded transformers model (a PreTrainedModel such as "
            f"AutoModelForCausalLM.from_pretrained(...)), got {type(model).__name__}"
        )
    config = model.config
    model_type = getattr(config, "model_type", "?")
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if config.is_encoder_decoder or not model.can_generate():
        raise ValueError(
            f"enable() needs a decoder-only causal LM (e.g. AutoModelForCausalLM); "
            f"{type(model).__name__} (model type {model_type!r}) cannot generate. "
            f"Supported model types: {supported}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by "
            f"nucleus_attn.enable; supported model types: {supported}"
        )
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so sparse decode cannot be switched on; upgrade "
            "transformers (>= 5.17) or use a supported model type: " + supported
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"model type {model_type!r} soft-caps attention logits "
            f"(attn_logit_softcapping={config.attn_logit_softcapping}), which SDPA and the "
            "sparse methods do not support"
        )
    if not getattr(config, "is_causal", True) or getattr(
            config, "use_bidirectional_attention", False):
        raise ValueError(f"model type {model_type!r} is configured for bidirectional "
                         "attention; sparse decode needs causal attention")
    kinds = set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES)
    if kinds:
        raise ValueError(
            f"model {type(model).__name__} has attention layers of type {sorted(kinds)}; "
            f"nucleus_attn handles {', '.join(SUPPORTED_LAYER_TYPES)}"
        )


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """Self-attention modules in layer order (those with ``layer_idx`` and a ``k_proj``)."""
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "k_proj") and idx not in found:
            found[idx] = module
    return [found[i] for i in sorted(found)]


def _layer_kind(model: PreTrainedModel, module: nn.Module, index: int, cfg: MethodConfig,
                dense_layers: int) -> str:
    if index < dense_layers or cfg.name == "dense":
        return "dense"
    layer_types = getattr(model.config, "layer_types", None)
    if getattr(module, "sliding_window", None) is not None or (
        layer_types and layer_types[index] == "sliding_attention"
    ):
        return "sliding"
    if model.config.model_type == "mistral" and getattr(model.config, "sliding_window", None):
        return "sliding"  # Mistral passes config.sliding_window to every layer
    return "sparse"


def enable(
    model: PreTrainedModel,
    method: str | MethodConfig = "twilight",
    *,
    dense_layers: int = 2,
    diagnostics: bool = False,
    stats: bool = True,
    compile: bool | dict[str, Any] | Any = False,
    **params: Any,
) -> SparseDecodeHandle:
    """Turn sparse decode attention on for a loaded transformers decoder.

    Prefill stays dense (transformers' SDPA attention). Each decode step of each layer
    from ``dense_layers`` on keeps only the keys the method selects, per KV head, and
    attends exactly over them. ``model.generate(...)`` then works as usual: greedy or
    sampling, batches with left padding, thousands of new tokens.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only causal LM of a supported type (:data:`SUPPORTED_MODEL_TYPES`:
        Llama, Mistral, Qwen2, Qwen3, Gemma3 text).
    method : str or MethodConfig
        A registered method name (:func:`nucleus_attn.methods`) or a config such as
        ``nucleus_attn.Twilight(p=0.9)``. Default ``"twilight"``.
    dense_layers : int
        The first layers that stay dense (default 2, as in Quest and Twilight); fewer
        than the model's layers, unless ``method`` is ``"dense"``.
    diagnostics : bool
        Also measure, at every step, the exact softmax mass of the kept keys per query
        head (reads every key: slow; default False). Kept token counts are recorded
        whenever ``stats`` is on.
    stats : bool
        Record kept token counts at each step (default True: one tiny device op per layer
        and step in eager steps; a few in-place ops inside CUDA-graph captures, so that
        every replay counts). Turn off for timing.
    compile : bool, dict or transformers.CompileConfig
        GPU only (a model on another device is refused). ``True`` makes
        ``model.generate`` use the fast path: a static (pre-allocated) KV cache and decode
        steps compiled with ``torch.compile(fullgraph=True, mode="reduce-overhead")``,
        i.e. the whole step (projections, norms, rotary, MLP fused by inductor, our
        attention as one opaque op per layer) replayed as one CUDA graph. A dict or a
        ``CompileConfig`` gives other ``torch.compile`` options. The first generation of
        each shape (batch, prompt + new tokens) compiles and records: call
        :meth:`SparseDecodeHandle.warmup` first. Restored by :meth:`disable`. Default
        False (eager steps, the model's own cache).
    **params
        The method's parameters (e.g. ``p=0.9``, ``base_budget=512``).

    Returns
    -------
    SparseDecodeHandle
        Call ``.disable()`` (or use it in a ``with`` block) to restore the model;
        ``.summary()`` gives the kept fraction and mass per layer and head.

    Raises
    ------
    TypeError
        ``model`` is not a transformers model, or a parameter is unknown to the method.
    ValueError
        The model type or one of its attention features (soft-capping, other layer
        types) is not supported, sparse decode is already on for this model (see
        :func:`disable`), ``dense_layers`` leaves no sparse layer, ``compile`` is asked
        for on a model that is not on a CUDA GPU, or a parameter is out of range.

    Notes
    -----
    - Sliding-window layers (Mistral, Gemma3's local layers) run dense SDPA with the
      window mask transformers gives: their window keeps its exact meaning, and they count
      as dense in the statistics. A Mistral config with ``sliding_window`` set thus runs
      every layer dense.
    - The method's metadata (page bounds, 4-bit keys, clusters) is built per layer from
      the prefill's keys (at the first decode step; with ``compile`` at the prefill, into
      the previous request's buffers), then updated with each appended token, the first
      decode token included. Every prefill (``q_len > 1``) starts over; a different batch
      size or a cache that shrank rebuilds it (decode steps on a cache filled without a
      prefill build from all of it).
    - With ``compile``, ``model.generate`` makes its own static cache; to pass a cache
      object of your own, also pass ``cache_implementation=None``. Call
      ``handle.warmup(prompt_tokens=..., new_tokens=...)`` with the requests' shape first:
      the first generation of a shape compiles (minutes for an 8B model) and records the
      CUDA graphs. Switching methods, statistics or handles records the graphs again (a
      replay runs the kernels recorded, and none of our Python).
    - Works with transformers' dynamic cache and with static (pre-allocated) caches, with
      left padding. In a static cache N is the allocated length: a fractional budget is a
      fraction of it, so give budgets in tokens there. Each decode step then runs without
      a host sync and can be captured in a CUDA graph. Host-side decisions (Tactic's
      re-clustering every ``recluster_every`` tokens) only happen in eager steps: during
      replays Tactic attends every decode token exactly (its always-kept list covers the
      static cache's free positions) and re-clusters at the next eager step or prefill.
    - Beam search (which reorders the cache rows behind the attention function) is not
      supported.

    Examples
    --------
    >>> import nucleus_attn as na
    >>> with na.enable(model, "twilight") as handle:  # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=256)
    ...     print(handle.summary()["mean_kept_fraction"])

    The fast path (GPU): a static cache and one CUDA graph per decode step.

    >>> handle = na.enable(model, "twilight", compile=True)  # doctest: +SKIP
    >>> handle.warmup(prompt_tokens=32768, new_tokens=256)  # doctest: +SKIP
    >>> out = model.generate(**inputs, max_new_tokens=256)  # doctest: +SKIP
    """
    cfg = make_config(method, **params)
    compile_config = _compile_config(compile)
    if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) or dense_layers < 0:
        raise ValueError(f"dense_layers={dense_layers!r} must be an int >= 0 (the first layers "
                         "kept dense; 2 by default)")
    _check_model(model)
    check_tensor_parallel(model)
    if compile_config is not None:
        _check_compile_device(model, compile_config)
    if model in _ENABLED:
        raise ValueError(
            f"sparse decode is already enabled on this model ({_ENABLED[model].config}); "
            "call .disable() on the first handle, or nucleus_attn.disable(model), before "
            "enabling again"
        )
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention layers with a layer_idx in "
                         f"{type(model).__name__}; it is not a supported decoder")
    if dense_layers >= len(modules) and cfg.name != "dense":
        raise ValueError(
            f"dense_layers={dense_layers} keeps every one of the {len(modules)} attention "
            f"layers of {type(model).__name__} dense, so no layer would run {cfg.name}; use "
            f"dense_layers < {len(modules)} (default 2), or method='dense' for dense "
            "attention in every layer"
        )
    previous = model.config._attn_implementation or "sdpa"
    config = model.config
    ranks = tp_world_size(model)  # under tensor parallelism each rank holds 1/ranks heads
    q_heads = getattr(config, "num_attention_heads", 1) // ranks
    kv_heads = (getattr(config, "num_key_value_heads", None) or q_heads * ranks) // ranks
    layers = {
        m.layer_idx: _Layer(LayerStats(m.layer_idx, _layer_kind(model, m, m.layer_idx, cfg,
                                                                 dense_layers),
                                       q_heads, kv_heads))
        for m in modules
    }
    AttentionInterface.register(ATTN_NAME, nucleus_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(previous)
        raise ValueError(f"{type(model).__name__} refused the attention implementation "
                         f"{ATTN_NAME!r}; it does not support switching attention at runtime")
    handle = SparseDecodeHandle(model, cfg, dense_layers, bool(diagnostics), bool(stats),
                                previous, layers, modules)
    for module in modules:
        _OWNER[module] = handle
    _ENABLED[model] = handle
    if compile_config is not None:
        handle._generation_config = _switch_generation(model, compile_config)
        handle.compiled = handle.compile_mode = True
    else:
        handle._generation_config = _keep_eager(model)
    _reset_graphs()  # graphs recorded under another handle would replay its kernels
    return handle


def disable(model: PreTrainedModel) -> SparseDecodeHandle | None:
    """Switch sparse decode off on ``model``, whichever handle switched it on.

    The way back when the handle :func:`enable` returned is lost (a notebook cell run
    twice, a handle made inside a function): the same as that handle's
    :meth:`~SparseDecodeHandle.disable`. Calling it on a model without sparse decode does
    nothing.

    Returns
    -------
    SparseDecodeHandle or None
        The handle that was switched off (its statistics stay readable), or None.

    Examples
    --------
    >>> na.enable(model, "twilight")  # doctest: +SKIP
    >>> na.disable(model)  # doctest: +SKIP
    SparseDecodeHandle(twilight:p=0.9, dense_layers=2, disabled)
    """
    handle = _ENABLED.get(model) if isinstance(model, nn.Module) else None
    if handle is None:
        return None
    handle.disable()
    return handle


def _check_compile_device(model: PreTrainedModel, compile_config: Any) -> None:
    """``compile=...`` records CUDA graphs: refuse a model that is not on a CUDA device
    (transformers would quietly run its decode steps uncompiled), unless the config asks
    for compilation on every device (``_compile_all_devices``, as the CPU tests do)."""
    device = model.device
    if device.type == "cuda" or getattr(compile_config, "_compile_all_devices", False):
        return
    raise ValueError(
        f"enable(compile=...): the model is on {device}, and the compiled path replays CUDA "
        "graphs, so it needs a CUDA GPU (model.to('cuda')); transformers would run the "
        f"decode steps uncompiled. On {device.type} drop compile= (eager decode steps)"
    )


def _compile_config(compile: Any) -> Any:
    """The ``transformers.CompileConfig`` that ``enable(compile=...)`` asks for, or None."""
    if compile is False or compile is None:
        return None
    from transformers import CompileConfig

    if compile is True:
        return CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    if isinstance(compile, CompileConfig):
        return compile
    if isinstance(compile, dict):
        return CompileConfig(**compile)
    raise TypeError(
        f"compile={compile!r} must be True/False, a dict of torch.compile options or a "
        "transformers.CompileConfig, e.g. compile=True or compile={'mode': 'max-autotune'}"
    )


_GENERATION_FIELDS = ("cache_implementation", "compile_config")


def _switch_generation(model: PreTrainedModel, compile_config: Any) -> dict[str, Any]:
    """Make ``model.generate`` use a static cache and compiled decode steps; returns what
    it replaced (for :func:`_restore_generation`)."""
    gen = model.generation_config
    previous = {name: getattr(gen, name, None) for name in _GENERATION_FIELDS}
    if getattr(gen, "disable_compile", False):
        raise ValueError("enable(compile=True): model.generation_config.disable_compile is "
                         "True; set it to False or leave compile off")
    gen.cache_implementation = "static"
    gen.compile_config = compile_config
    return previous


def _keep_eager(model: PreTrainedModel) -> dict[str, Any]:
    """Plain ``enable()``: keep ``model.generate``'s decode steps eager. For a static cache
    on a GPU transformers would otherwise compile them itself (CUDA graphs whose memory
    pool refuses the metadata that our first decode step builds when the prefill ran
    uncompiled); ``enable(compile=True)`` is the compiled path. Returns what it replaced."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    previous = {"disable_compile": getattr(gen, "disable_compile", None)}
    gen.disable_compile = True
    return previous


def _restore_generation(model: PreTrainedModel, previous: dict[str, Any]) -> None:
    for name, value in previous.items():
        setattr(model.generation_config, name, value)
