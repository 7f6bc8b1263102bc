"""Per-process plugin state resolved from the vLLM config: the CP group, the MoE
communicator, the kernel provider and the attention split policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm.config import VllmConfig
from vllm.distributed import get_ep_group, get_tp_group
from vllm.platforms import current_platform

from ..communicator import CpGroup, MoeCommunicator
from ..config import CpNsaConfig, CpNsaConfigError
from ..extensions import resolve_kernel_provider, resolve_moe_communicator
from ..split_policy import AttentionSplitPolicy, resolve_split_policy

logger = logging.getLogger("vllm.cp_nsa")


class VllmTpGroup:
    """``CpGroup`` over one of vLLM's ``GroupCoordinator``s: the tensor-parallel one (the CP
    group), or the expert-parallel one for the ``scattered`` MoE under DP."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.world_size = coordinator.world_size
        self.rank = coordinator.rank_in_group

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.all_gather(x.contiguous(), dim=0)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.reduce_scatter(x.contiguous(), dim=0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.coordinator.all_reduce(x)

    def all_to_all(self, x, output_split_sizes, input_split_sizes):
        out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes, input_split_sizes,
            group=self.coordinator.device_group,
        )
        return out


def expert_all_to_all_configured(vllm_config: VllmConfig) -> bool:
    """Expert parallelism whose rows travel by all-to-all: a dispatching backend, or any
    backend under data parallelism (each DP replica's ranks hold different tokens, so the
    only MoE layout that works across replicas is the expert-parallel one)."""
    parallel = vllm_config.parallel_config
    if not parallel.enable_expert_parallel:
        return False
    return parallel.data_parallel_size > 1 or parallel.all2all_backend not in (
        "allgather_reducescatter",
        "passthrough",
    )


def moe_group_coordinator(vllm_config: VllmConfig):
    """The vLLM group the ``scattered`` MoE spreads its experts over.

    Without DP: the TP (= CP) group. With ``--data-parallel-size D --enable-expert-parallel``:
    vLLM's EP group (all D x N ranks of the DP replicas' TP groups, the same group its own
    FusedMoE dispatches over), so every expert lives on exactly one of the D x N ranks and a
    row reaches it from any replica."""
    if vllm_config.parallel_config.data_parallel_size > 1:
        return get_ep_group()
    return get_tp_group()


def vllm_expert_parallel_moe(vllm_config: VllmConfig) -> tuple[bool, str]:
    """Whether the ``scattered`` MoE hands its rows to vLLM's own expert-parallel FusedMoE
    (``ep_moe.VllmExpertParallelMoE``) rather than the plugin's torch all-to-all, and why.

    vLLM runs its MoE on per-rank rows only under its sequence-parallel MoE, and only on
    GPUs: its CPU communicator has no ``all_gatherv`` and its CPU fused-MoE kernel ignores
    the expert map, so on CPU the torch all-to-all stays."""
    parallel = vllm_config.parallel_config
    backend = parallel.all2all_backend
    if not parallel.use_sequence_parallel_moe:
        return False, (f"vLLM's sequence-parallel MoE is off here (it needs --data-parallel-size > 1, -tp > 1, "
                       f"--enable-expert-parallel and a dispatching --all2all-backend; '{backend}' is set)")
    if current_platform.is_cpu():
        return False, ("vLLM's CPU build cannot run its expert-parallel MoE (no all_gatherv in its CPU "
                       "communicator, its CPU fused-MoE kernel ignores the expert map)")
    return True, f"vLLM's FusedMoE with its '{backend}' all2all backend"


def resolve_ops_and_communicator(vllm_config: VllmConfig, device: torch.device, num_heads: int):
    """(options, kernel provider, MoE communicator) the configuration selects."""
    options = CpNsaConfig.from_additional_config(vllm_config.additional_config)
    ops = resolve_kernel_provider(options.kernels, device, vllm_config.model_config.dtype, num_heads)
    communicator = resolve_moe_communicator(options.moe, expert_all_to_all_configured(vllm_config))
    return options, ops, communicator


def cuda_graph_support(vllm_config: VllmConfig) -> tuple[bool, str]:
    """Whether FULL CUDA graphs can hold the plugin's forward for uniform decode /
    verify batches, and why (for the startup log).

    Needs a kernel provider and a MoE communicator without host syncs; the split
    plan itself is staged into persistent buffers by the metadata builder.
    """
    device = torch.device(current_platform.device_type)
    if device.type != "cuda":
        return False, f"no CUDA graphs on {device.type}"
    _, ops, communicator = resolve_ops_and_communicator(
        vllm_config, device, vllm_config.model_config.hf_config.num_attention_heads
    )
    if not getattr(ops, "supports_cuda_graphs", False):
        return False, f"kernel provider '{ops.name}' syncs with the host"
    if not getattr(communicator, "supports_cuda_graphs", False):
        return False, f"MoE communicator '{communicator.name}' has data-dependent collective sizes"
    return True, f"kernels '{ops.name}', uniform decode / verify batches"


def heads_split_blocker(vllm_config: VllmConfig) -> str | None:
    """Why the attention heads cannot be split over the CP ranks on this model (None if they
    can): splitting them slices the replicated ``q_b_proj`` / ``o_proj`` weights by head,
    which only unquantized weights allow, and needs heads divisible by the ranks."""
    model_config = vllm_config.model_config
    ranks = vllm_config.parallel_config.tensor_parallel_size
    heads = model_config.hf_config.num_attention_heads
    if model_config.quantization:
        return (f"the checkpoint quantizes q_b_proj / o_proj ({model_config.quantization}) and only "
                "unquantized weights can be sliced by head")
    if heads % ranks:
        return f"the {heads} attention heads are not a multiple of the {ranks} ranks"
    return None


def attention_split_policy(vllm_config: VllmConfig) -> AttentionSplitPolicy:
    """When batches split over the ranks and whether unsplit ones split the heads
    (``split_policy``), from the configuration alone: the config hook resolves it once at
    startup (logs it, sizes the graphs by it, refuses what cannot run), and every worker's
    metadata builder and model resolve the same value from the same config.

    ``decode_attention: tp`` where the heads cannot be split fails, naming the fix."""
    options = CpNsaConfig.from_additional_config(vllm_config.additional_config)
    cp_size = vllm_config.parallel_config.tensor_parallel_size
    blocker = heads_split_blocker(vllm_config) if cp_size > 1 else None
    if options.decode_attention == "tp" and blocker:
        raise CpNsaConfigError(
            f"vllm_cp_nsa: decode_attention='tp' splits the attention heads over the {cp_size} ranks, "
            f"but {blocker}. Use decode_attention='auto' (split decode here) or 'split'."
        )
    return resolve_split_policy(options.decode_attention, options.min_tokens_for_cp, cp_size,
                                vllm_config.cache_config.cache_dtype, blocker, cp_on=options.mode != "off")


def num_speculative_tokens(vllm_config: VllmConfig) -> int:
    spec = vllm_config.speculative_config
    return (spec.num_speculative_tokens or 0) if spec is not None else 0


@dataclass
class CpNsaRuntime:
    """What the model's layers use at run time (the split itself comes with each
    forward's metadata, built by the attention backend)."""

    group: CpGroup
    communicator: MoeCommunicator
    ops: object
    indexer_cache_fp8: bool
    """Indexer keys stored as 132-byte fp8 (``CpNsaConfig.indexer_cache_fp8``)."""
    heads_split: bool = False
    """``AttentionSplitPolicy.heads_split``: a batch that runs unsplit (decode / verify batches
    among them under ``decode_attention: tp``) splits the attention heads over the ranks
    instead of repeating all of them."""
    moe_group: CpGroup | None = None
    """The ranks the ``scattered`` MoE's experts are spread over (``moe_group_coordinator``);
    None: the CP group."""
    vllm_expert_parallel: bool = False
    """``scattered`` rides vLLM's own expert-parallel FusedMoE (``vllm_expert_parallel_moe``)."""

    @property
    def expert_group(self) -> CpGroup:
        return self.moe_group if self.moe_group is not None else self.group

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig, device: torch.device, num_heads: int) -> "CpNsaRuntime":
        options, ops, communicator = resolve_ops_and_communicator(vllm_config, device, num_heads)
        detail = getattr(ops, "startup_detail", lambda: "")()
        logger.info("vllm_cp_nsa: kernel provider '%s' on %s (requested '%s')%s", ops.name, device,
                    options.kernels, f": {detail}" if detail else "")
        index_fp8 = options.indexer_cache_fp8(vllm_config.cache_config.cache_dtype,
                                              getattr(ops, "reads_fp8_indexer_cache", False))
        group = VllmTpGroup(get_tp_group())
        heads_split = attention_split_policy(vllm_config).heads_split
        scattered = communicator.name == "scattered"
        vllm_ep = scattered and vllm_expert_parallel_moe(vllm_config)[0]
        moe_group = (VllmTpGroup(moe_group_coordinator(vllm_config))
                     if scattered and not vllm_ep and vllm_config.parallel_config.data_parallel_size > 1
                     else None)
        return cls(group, communicator, ops, index_fp8, heads_split, moe_group, vllm_ep)
