#!/usr/bin/env bash
# The whole pipeline on one CUDA GPU in a few minutes (target <= 8 min), with the figures the README wants:
#   phantom -> nnU-Net plan/preprocess -> LeFusion sampler trained on CUDA (bf16) -> synthesis, fast and official
#   schedules -> nnUNetv2_train -tr nnUNetTrainerLeFusion_short from the cache, in online mode, and the
#   _r000_short control -> synthetic cases per minute, online/r000 epoch-time ratio, peak GPU memory (headline last).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--work DIR] [--steps N] [--epochs N] [--iterations N]
#                                [--fast-cases N] [--official-cases N] [--online-cases N] [--device cuda|cpu]
#   bash benchmarks/gpu_check.sh --install-only --wheels DIR      # install a first part of the wheels, run nothing
#   bash benchmarks/gpu_check.sh --fetch-wheels [--wheels DIR]     # here, with a package index: fill DIR
#
# The GPU machine may have no package index: packages its python lacks (nnunetv2 and its own dependencies) come as
# files in --wheels (default work_runs/wheels, carried with the working tree): every *.whl is installed with
# pip --no-index --no-deps into work_runs/gpu_site (kept on a warm machine between calls), every *.tar.xz (a wheel
# repacked with xz by --fetch-wheels) is unpacked there. The plugin itself is imported from this checkout
# (PYTHONPATH), so nothing is installed into the machine's python. Every command is printed before it runs;
# --dry-run prints them and runs nothing. See docs/gpu_check.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=$REPO/work_runs/wheels
WORK=${TMPDIR:-/tmp}/lefusion_gpu_check
STEPS=300
EPOCHS=4
ITERATIONS=40
FAST_CASES=16
OFFICIAL_CASES=2
ONLINE_CASES=4
DEVICE=cuda  # cpu: a slow smoke run of the same steps on a machine without a GPU
DRY_RUN=0
FETCH=0
INSTALL_ONLY=0
SITE=$REPO/work_runs/gpu_site
PY=${PYTHON:-python3}
DATASET=997
# What the GPU image lacks of nnU-Net's import closure (the rest, torch included, is there); versions as in .venv.
PACKAGES=(nnunetv2==2.8.1 acvl_utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
          dynamic_network_architectures==0.4.4 blosc2==4.16.1 ndindex==1.10.1 connected-components-3d==4.1.1
          nibabel==5.4.2 simpleitk==2.5.2)

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --install-only) INSTALL_ONLY=1 ;;
        --wheels) WHEELS=$(realpath -m "$2"); shift ;;
        --work) WORK=$(realpath -m "$2"); shift ;;
        --steps) STEPS=$2; shift ;;
        --epochs) EPOCHS=$2; shift ;;
        --iterations) ITERATIONS=$2; shift ;;
        --fast-cases) FAST_CASES=$2; shift ;;
        --official-cases) OFFICIAL_CASES=$2; shift ;;
        --online-cases) ONLINE_CASES=$2; shift ;;
        --device) DEVICE=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {  # print a command, then run it unless --dry-run
    echo "+ $*"
    ((DRY_RUN)) || "$@"
}

if ((FETCH)); then
    mkdir -p "$WHEELS"
    run "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
    for wheel in "$WHEELS"/*.whl; do  # over 20 MB: repack with xz so that the carried tree stays under 64 MiB
        if [[ -f $wheel ]] && (($(stat -c %s "$wheel") > 20000000)); then
            run bash -c "rm -rf '$wheel.d' && mkdir '$wheel.d' && cd '$wheel.d' && $PY -m zipfile -e '$wheel' . \
                && tar -cf - . | xz -6 -T0 > '${wheel%.whl}.tar.xz' && cd .. && rm -rf '$wheel.d' '$wheel'"
        fi
    done
    exit 0
fi

RAW=$WORK/nnUNet_raw
export nnUNet_raw=$RAW nnUNet_preprocessed=$WORK/nnUNet_preprocessed nnUNet_results=$WORK/nnUNet_results
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export nnUNet_compile=f nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-8}  # compiling would dominate runs this short
TIMES=$WORK/stage_times.tsv

cli() {  # cli NAME MODULE:FUNCTION ARGS...: a console script run from this checkout, printed by its name
    local name=$1 target=$2
    shift 2
    echo "+ ${CLI_ENV:+$CLI_ENV }$name $*"
    ((DRY_RUN)) || "$PY" -c "import sys; from ${target%:*} import ${target#*:} as entry; sys.argv[0] = '$name'; \
sys.exit(entry())" "$@"
}

stage() {  # stage NAME COMMAND...: run a command and record its wall time
    local name=$1 start
    shift
    echo "=== $name"
    start=$(date +%s.%N)
    "$@"
    ((DRY_RUN)) || printf '%s\t%s\t%s\n' "$name" "$start" "$(date +%s.%N)" >> "$TIMES"
}

train() {  # train RESULTS_NAME TRAINER [VAR=VALUE ...]: a short nnU-Net run into its own results folder
    local name=$1 trainer=$2
    shift 2
    local settings=(nnUNet_results="$WORK/results_$name" LEFUSION_EPOCHS="$EPOCHS" LEFUSION_ITERS="$ITERATIONS"
                    LEFUSION_VAL_ITERS=5 "$@")
    (export "${settings[@]}"; CLI_ENV="${settings[*]}" cli nnUNetv2_train nnunetv2.run.run_training:run_training_entry \
        "$DATASET" 3d_fullres 0 -tr "$trainer" -device "$DEVICE")
}

echo "gpu_check on $DEVICE: work folder $WORK, wheels $WHEELS, sampler $STEPS steps," \
    "nnU-Net $EPOCHS epochs x $ITERATIONS iterations"
run mkdir -p "$SITE"
if ((DRY_RUN)) || compgen -G "$WHEELS/*.whl" > /dev/null; then
    run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
fi
if ((DRY_RUN)) || compgen -G "$WHEELS/*.tar.xz" > /dev/null; then
    for archive in "$WHEELS"/*.tar.xz; do run tar -xJf "$archive" -C "$SITE"; done
fi
((INSTALL_ONLY)) && exit 0
run rm -rf "$WORK"
run mkdir -p "$WORK" "$RAW"
[[ $DEVICE == cpu ]] || run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run "$PY" -c "import torch, nnunetv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if ((!DRY_RUN)) && [[ $DEVICE != cpu ]]; then  # GPU memory of all processes every 0.5 s, for the peak per stage
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/gpu_memory.csv" &
    POLLER=$!
    trap 'kill $POLLER 2> /dev/null || true' EXIT
fi
cli nnUNetv2_lefusion_register nnunet_lefusion.cli.register:main

SAMPLER=$WORK/sampler
BF16=(--bf16)
BATCH=24
[[ $DEVICE != cpu ]] || { BF16=(); BATCH=4; }  # a CPU without bf16 hardware only emulates it, many times slower
CHECKPOINT=$SAMPLER/checkpoint_final.pt
SYNTH=(-d "$DATASET" -c 3d_fullres -f 0 --method lefusion --checkpoint "$CHECKPOINT" --mask-generator rule
       --mix retexture=0.5,newmask=0.25,normal=0.25 -device "$DEVICE")
stage phantom cli nnUNetv2_lefusion_phantom nnunet_lefusion.cli.phantom:main -d "$DATASET" -n 30 --seed 7 --fov heart
stage plan_and_preprocess cli nnUNetv2_plan_and_preprocess \
    nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry \
    -d "$DATASET" -c 3d_fullres -np 8 -npfp 8
stage train_sampler cli nnUNetv2_lefusion_train_sampler nnunet_lefusion.cli.train_sampler:main -d "$DATASET" -f 0 \
    --config small --roi 10 48 48 "${BF16[@]}" --batch-size "$BATCH" --lr 2e-4 --histogram-scale 16 --cond-drop 0.1 \
    --steps "$STEPS" --checkpoint-every 100 -device "$DEVICE" -o "$SAMPLER"
stage synthesize_fast cli nnUNetv2_lefusion_synthesize nnunet_lefusion.cli.synthesize:main "${SYNTH[@]}" \
    --sampling fast -n "$FAST_CASES" --cache "$WORK/cache_fast" --preview "$WORK/preview"
((OFFICIAL_CASES == 0)) || stage synthesize_official cli nnUNetv2_lefusion_synthesize \
    nnunet_lefusion.cli.synthesize:main "${SYNTH[@]}" \
    --sampling official -n "$OFFICIAL_CASES" --cache "$WORK/cache_official"
stage train_cache train cache nnUNetTrainerLeFusion_short LEFUSION_CACHE="$WORK/cache_fast"
stage train_online train online nnUNetTrainerLeFusion_short LEFUSION_MODE=online LEFUSION_METHOD=lefusion \
    LEFUSION_CASES_PER_EPOCH="$ONLINE_CASES" \
    LEFUSION_CHECKPOINT="$CHECKPOINT" LEFUSION_MASK_GENERATOR=rule LEFUSION_MIX=retexture=0.5,newmask=0.25,normal=0.25 \
    LEFUSION_CACHE="$WORK/cache_online"
stage train_r000 train r000 nnUNetTrainerLeFusion_r000_short

run "$PY" "$REPO/benchmarks/gpu_check_report.py" "$WORK" --fast-cases "$FAST_CASES" \
    --official-cases "$OFFICIAL_CASES" --steps "$STEPS"
