# shellcheck shell=bash disable=SC2034  # CONFIG, RUN_DIR, DEVICE, ... are read by the scripts sourcing this
# Shared by slurm/train.sbatch, slurm/multinode.sbatch and slurm/sweep.sbatch; sourced from the project folder, never
# run on its own.
#
# The contract with train.py: exit 0 = finished; 75 = stopped on SIGUSR1/SIGTERM/SIGINT after saving a checkpoint,
# rerun the same command to resume (checkpoint.resume: auto); 74 = a write to the run folder failed (disk full), the
# previous checkpoint intact; anything else = a real failure.
#
# Signals. SLURM sends `--signal=B:USR1@N` to this batch shell only, and SIGTERM on scancel, time limit or
# preemption to every process of the job. The launcher (torch elastic under `accelerate launch`) does not forward
# SIGUSR1 (pytorch #154849), and on SIGTERM it kills its workers after a grace period and exits without their exit
# codes. So the launcher runs with SIGINT/SIGTERM/SIGUSR1 ignored (PET_SIGNALS_TO_HANDLE, torchrun's
# --signals-to-handle, stops it re-arming SIGTERM/SIGINT) and this shell forwards SIGUSR1/SIGTERM to the training
# processes themselves; train.py installs its own handlers, absorbs repeats, and all ranks agree on the step to stop
# at. The launcher itself exits 1 when its workers exit 75, so the outcome is read from the run folder with
# `python -m cifar.run_folder state` (cifar/run_folder.py's states: running | stopped | finished | failed |
# save-failed | killed), which reads the status.json train.py's main process writes, and its lock. Multi-node: srun
# passes SIGUSR1 on to each node's task, but on SLURM's SIGTERM it kills the step at once, so there the SIGUSR1
# warning is what saves in time.

MAX_RESTARTS=${MAX_RESTARTS:-10}     # stop requeueing after this many restarts of one job
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1            # log lines reach runs/slurm-<job>.out as they happen

# This job as scontrol, squeue and sacct name it. An array task is ARRAYID_TASK, not its own SLURM_JOB_ID: one task
# of every array (the last to start) has the array's id as its SLURM_JOB_ID, and `scontrol requeue <array id>` requeues
# every task of the array, finished ones too (`scontrol show job <array id>` shows them all).
JOB_LABEL=${SLURM_JOB_ID:-none}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    JOB_LABEL=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
fi
AGAIN=""                             # how to continue a run that is not requeued (set by setup_run/setup_sweep_run)

log() { printf '[%(%F %T)T slurm job %s] %s\n' -1 "$JOB_LABEL" "$*"; }
die() { log "error: $*" >&2; exit 2; }

# ----------------------------------------------------------------------------- the run

# find_recipe RECIPE: the file a recipe argument names, as train.py's --config finds it: the file itself, or a
# recipe shipped in the package named alone (debug, debug.yaml: cifar/recipes/); empty when neither.
find_recipe() {
    if [[ -f $1 ]]; then
        echo "$1"
    elif [[ $1 != */* && -f cifar/recipes/${1%.yaml}.yaml ]]; then
        echo "cifar/recipes/${1%.yaml}.yaml"
    fi
}

# setup_run RECIPE [key=value ...]: sets CONFIG, OVERRIDES (with output_dir appended unless given) and RUN_DIR.
# The run folder is keyed by the job id, so a requeued job (same id) resumes its own run.
setup_run() {
    (( $# >= 1 )) || die "usage: sbatch slurm/<script>.sbatch configs/RECIPE.yaml [section.key=value ...]"
    CONFIG=$1
    shift
    [[ -n $(find_recipe "$CONFIG") ]] || die "recipe $CONFIG not found in $PWD (submit from the project folder or" \
        "set PROJECT_DIR)"
    [[ -f train.py ]] || die "train.py not found in $PWD (submit from the project folder or set PROJECT_DIR)"
    OVERRIDES=("$@")
    RUN_DIR=""
    local i
    for (( i = 1; i <= $#; i++ )); do
        case ${!i} in
            output_dir=*) RUN_DIR=${!i#output_dir=} ;;
            --output_dir=*) RUN_DIR=${!i#--output_dir=} ;;
            --output_dir) local next=$(( i + 1 )); RUN_DIR=${!next:-} ;;
        esac
    done
    if [[ -z $RUN_DIR ]]; then
        local recipe
        recipe=$(basename "$CONFIG")
        recipe=${recipe%.*}
        RUN_DIR="${RUNS_DIR:-runs}/${recipe}-job${SLURM_JOB_ID:?not inside a SLURM job}"
        OVERRIDES+=("output_dir=$RUN_DIR")
    fi
    AGAIN="submit again with output_dir=$RUN_DIR"
}

# setup_sweep_run SWEEP.yaml [cifar.sweep options: --runs-dir=D --seed=S]: run number SLURM_ARRAY_TASK_ID of a sweep
# file. Sets CONFIG (empty when the sweep names no recipe: train.py's defaults), OVERRIDES and RUN_DIR from
# `python -m cifar.sweep SWEEP.yaml --index I --print-args`, so the run folder is the sweep's own,
# <runs-dir>/<sweep name>/<II>-<key=value,...>, the one `python -m cifar.sweep` makes for run I: a requeued task (same
# index) and a later local run of the sweep both resume it. A bad index or sweep file: cifar.sweep's one `error:` line
# lands in the log and the task fails at once with its exit code (2), not requeued.
setup_sweep_run() {
    (( $# >= 1 )) || die "usage: sbatch --array=0-N slurm/sweep.sbatch SWEEP.yaml [--runs-dir=D] [--seed=S]"
    local sweep=$1
    [[ -f train.py ]] || die "train.py not found in $PWD (submit from the project folder or set PROJECT_DIR)"
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "not an array task: submit with sbatch --array=0-N (python -m" \
        "cifar.sweep $sweep --slurm prints the line)"
    local out rc
    out=$("$PYTHON" -m cifar.sweep "$@" --index "$SLURM_ARRAY_TASK_ID" --print-args)
    rc=$?
    if (( rc != 0 )); then
        log "python -m cifar.sweep $* --index $SLURM_ARRAY_TASK_ID --print-args exited $rc (the reason is above):" \
            "not training, not requeueing"
        exit "$rc"
    fi
    local args
    mapfile -t args <<< "$out"
    [[ ${args[-1]} == output_dir=* ]] || die "python -m cifar.sweep --print-args gave no output_dir=... last: $out"
    RUN_DIR=${args[-1]#output_dir=}
    CONFIG=""
    if [[ ${args[0]} == --config ]]; then
        CONFIG=${args[1]}
        args=("${args[@]:2}")
    fi
    OVERRIDES=("${args[@]}")
    [[ -z $CONFIG || -n $(find_recipe "$CONFIG") ]] || die "recipe $CONFIG (named in $sweep) not found in $PWD"
    AGAIN="submit this index again (sbatch --array=$SLURM_ARRAY_TASK_ID slurm/sweep.sbatch $*), which resumes $RUN_DIR"
}

# ----------------------------------------------------------------------------- devices

# GPUs this job has on this node: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else SLURM_GPUS_PER_NODE ("a100:4").
gpus_on_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    if [[ $n =~ ^[0-9]+$ ]] && (( n > 0 )); then echo "$n"; return; fi
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    n=${SLURM_GPUS_PER_NODE:-}
    n=${n##*:}
    if [[ $n =~ ^[0-9]+$ ]]; then echo "$n"; return; fi
    echo 0
}

# Sets NPROC (training processes on this node) and DEVICE, from this start's allocation (a requeued job may get
# another one: with data.global_batch in the recipe it resumes on it, docs/distributed.md). CPU=1 forces the CPU
# (GPUs hidden); NPROC_PER_NODE overrides the count; on CPU, CPUS_PER_PROCESS=N runs one process per N CPUs of the
# allocation (default: NPROC_PER_NODE, else 1).
setup_devices() {
    local gpus
    gpus=$(gpus_on_node)
    if [[ ${CPU:-0} == 1 ]] || (( gpus == 0 )); then
        DEVICE=cpu
        NPROC=${NPROC_PER_NODE:-1}
        if [[ -z ${NPROC_PER_NODE:-} && -n ${CPUS_PER_PROCESS:-} ]]; then
            [[ $CPUS_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "CPUS_PER_PROCESS must be a positive integer, got" \
                "'$CPUS_PER_PROCESS'"
            local allocated=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
            NPROC=$(( allocated / CPUS_PER_PROCESS > 0 ? allocated / CPUS_PER_PROCESS : 1 ))
        fi
        export ACCELERATE_USE_CPU=1
        [[ ${CPU:-0} == 1 ]] && export CUDA_VISIBLE_DEVICES=""
        local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$NPROC}}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / NPROC > 0 ? cpus / NPROC : 1 ))}
    else
        DEVICE="gpu x$gpus"
        NPROC=${NPROC_PER_NODE:-$gpus}
    fi
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC'"
}

# Rendezvous port, the same on every node and for every restart of the job, different between jobs.
job_port() { echo $(( 20000 + ${SLURM_JOB_ID:-0} % 20000 )); }

# build_launch MACHINES MACHINE_RANK MAIN_IP: sets LAUNCH, the command for this machine.
build_launch() {
    local machines=$1 rank=$2 main_ip=$3
    local script=(train.py)
    [[ -n $CONFIG ]] && script+=(--config "$CONFIG")   # a sweep without a recipe: train.py's defaults
    script+=("${OVERRIDES[@]}")
    if (( machines == 1 && NPROC == 1 )); then
        LAUNCH_KIND=python
        LAUNCH=("$PYTHON" "${script[@]}")
        return
    fi
    LAUNCH_KIND=accelerate
    LAUNCH=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes $(( machines * NPROC ))
            --num_machines "$machines" --machine_rank "$rank" --main_process_port "$(job_port)")
    # no --mixed_precision / --dynamo_backend: given, even as `no`, they would beat the recipe (cifar/precedence.py)
    if (( machines > 1 )); then
        # c10d rendezvous at the first node; only machine 0 hosts the store (so two "machines" on one node,
        # as in the tests, do not race for the port).
        LAUNCH+=(--main_process_ip "$main_ip" --rdzv_backend c10d --rdzv_conf "is_host=$(( rank == 0 ? 1 : 0 ))")
    fi
    LAUNCH+=("${script[@]}")
}

# ----------------------------------------------------------------------------- running with signals

CHILD=""
HELD=""          # 1 when train.py found the run folder held by another process
STOPPING=""      # the latest stop signal (USR1 | TERM), empty until one comes
SIGNALS_SEEN=" "  # every stop signal received, each logged once
LAUNCH_KIND=""   # python (train.py itself) | accelerate (a launcher whose children train) | srun (one per machine)

# forward SIG: pass a preemption signal on to the training processes: to train.py itself, to the launcher's
# children (not the launcher), or to srun, which passes it to every task (machine_main below) of the step.
forward() {
    local sig=$1
    # At a time limit SLURM sends the --signal warning (if not sent yet) and SIGTERM in the same second: log both.
    if [[ -z $STOPPING ]]; then
        log "SIG$sig received: asking training to save a checkpoint and stop"
    elif [[ $SIGNALS_SEEN != *" $sig "* ]]; then
        log "SIG$sig received as well (already stopping on SIG$STOPPING)"
    fi
    SIGNALS_SEEN+="$sig "
    STOPPING=$sig
    [[ -n $CHILD ]] || return 0
    case $LAUNCH_KIND in
        python) kill -s "$sig" "$CHILD" 2> /dev/null ;;
        srun) kill -s USR1 "$CHILD" 2> /dev/null ;;   # srun passes USR1 on; SIGTERM would make it abort the step
        accelerate) pkill "-$sig" -P "$CHILD" -f 'train\.py' 2> /dev/null ;;
    esac
    return 0
}

# wait_child PID: wait for PID through any number of trapped signals; sets WAIT_RC to its exit status.
wait_child() {
    local pid=$1 saved
    while :; do
        wait "$pid"
        WAIT_RC=$?
        (( WAIT_RC > 128 )) || return 0
        # >128: the child's own status, or a trapped signal cut the wait short (then the child still runs)
        kill -0 "$pid" 2> /dev/null && continue
        wait "$pid"   # gone: bash kept its status, which a trap may have hidden
        saved=$?
        (( saved == 127 )) || WAIT_RC=$saved
        return 0
    done
}

# run_status: the run folder's state (python -m cifar.run_folder state: running | stopped | finished | failed |
# save-failed | killed, cifar/run_folder.py) if train.py's main process wrote RUN_DIR/status.json after MARKER was
# made; empty otherwise (train.py refused before writing anything, or never started).
run_status() {
    [[ -f $RUN_DIR/status.json && $RUN_DIR/status.json -nt $MARKER ]] || return 0
    "$PYTHON" -m cifar.run_folder state "$RUN_DIR" 2> /dev/null
}

# held_elsewhere: whether another process (another job, a local run) holds RUN_DIR's lock now that ours has ended.
held_elsewhere() {
    [[ $("$PYTHON" -m cifar.run_folder state "$RUN_DIR" 2> /dev/null) == running ]]
}

# run_launch: run LAUNCH with the signal forwarding above; sets RC to 0 (finished), 75 (resumable) or the failure.
run_launch() {
    MARKER=$(mktemp "${TMPDIR:-/tmp}/launch-${SLURM_JOB_ID:-x}-XXXXXX")
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    trap 'forward TERM' INT   # a second SIGINT would make train.py exit without a checkpoint: send SIGTERM
    if [[ $LAUNCH_KIND == srun ]]; then
        "${LAUNCH[@]}" &   # srun must see USR1 to pass it on (it re-arms SIGTERM whatever we do)
    else
        ( trap '' INT TERM USR1
          export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
          exec "${LAUNCH[@]}" ) &
    fi
    CHILD=$!
    [[ -n $STOPPING ]] && forward "$STOPPING"   # a signal that came before the launch
    wait_child "$CHILD"
    RC=$WAIT_RC
    CHILD=""
    # The launcher reports a worker's exit 75 as its own failure (exit 1): status.json says what really happened.
    local state
    state=$(run_status)
    if (( RC != 0 && RC != 75 )); then
        case $state in
            stopped) log "the launcher exited $RC; training stopped with a checkpoint (status.json)"; RC=75 ;;
            finished) log "the launcher exited $RC after training finished (status.json)"; RC=0 ;;
            save-failed) log "the launcher exited $RC; a write to the run folder failed (status.json)"; RC=74 ;;
            "") if held_elsewhere; then
                    # train.py refused before any work (its error line names the holder): never run one folder twice
                    log "$RUN_DIR is held by another process (see the error line above): not training here"
                    HELD=1
                fi ;;
        esac
    fi
    if [[ $LAUNCH_KIND == srun && -n $STOPPING ]] && (( RC >= 128 )); then
        # SLURM's own SIGTERM (scancel, time limit, preemption) reaches srun too, which then kills the step at once
        # and loses the machines' exit codes. Multi-node runs rely on the SIGUSR1 warning (--signal=B:USR1@N) to
        # save in time; after a SIGTERM, resume takes the newest checkpoint that verifies.
        log "srun ended the step (exit $RC) after SIG$STOPPING; counting the run as stopped (resume takes the" \
            "newest valid checkpoint)"
        RC=75
    fi
    rm -f "$MARKER"
}

# ----------------------------------------------------------------------------- multi-node

# machine_main RECIPE [key=value ...]: one machine of a multi-node run, run by srun as one task per node (the
# variables below are read here, per task, not in the batch shell: in the batch shell SLURM_NODEID is 0 everywhere,
# accelerate #2816). Exits 0 (finished), 75 (stopped with a checkpoint) or a failure code above 75, so that srun's
# exit code (the highest of its tasks) is a failure if any machine failed, else 75 if any machine stopped.
machine_main() {
    setup_run "$@"
    setup_devices
    local machines=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}} nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
    local rank=${SLURM_NODEID:-0}
    if (( machines > nodes )); then
        rank=${SLURM_PROCID:-0}   # several machines per node (MACHINES_PER_NODE, the tests): rank by task
    fi
    build_launch "$machines" "$rank" "${MAIN_IP:?set by multinode.sbatch}"
    (( rank == 0 )) && log "machine 0 of $machines on $(hostname -s): ${LAUNCH[*]}"
    run_launch
    case $RC in
        0 | 75) exit "$RC" ;;
        *) log "machine $rank on $(hostname -s) failed (exit $RC)"
           exit $(( RC > 75 ? RC : 100 + RC )) ;;
    esac
}

# ----------------------------------------------------------------------------- after the run (batch shell only)

log_start() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts > 0 )); then
        log "restart $restarts of this job: resuming from the newest checkpoint in $RUN_DIR"
    else
        log "starting in $RUN_DIR"
    fi
    log "nodes ${SLURM_JOB_NODELIST:-?} | $1 | recipe ${CONFIG:-(defaults)} ${OVERRIDES[*]}"
}

# finish RC: exit 0 when finished; on 75 requeue this job (at most MAX_RESTARTS times); otherwise fail with RC.
finish() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    AGAIN=${AGAIN:-submit again with output_dir=$RUN_DIR}
    trap '' USR1 TERM INT
    case $rc in
        0)
            log "training finished: $RUN_DIR"
            exit 0 ;;
        75)
            if (( restarts >= MAX_RESTARTS )); then
                log "stopped with a checkpoint after $restarts restarts (MAX_RESTARTS=$MAX_RESTARTS): not requeueing;" \
                    "to continue, $AGAIN"
                exit 75
            fi
            # A job being ended (COMPLETING) for any reason but its time limit or preemption was cancelled by a
            # person (scancel): keep the checkpoint, do not requeue. A signal to a running job (the USR1 warning,
            # scancel --signal) or a time limit / preemption requeues.
            local info
            info=$(scontrol show job -o "$JOB_LABEL" 2> /dev/null)
            if [[ $info =~ JobState=(COMPLETING|CANCELLED) && ! $info =~ Reason=(TimeLimit|Preempt) ]]; then
                log "stopped with a checkpoint; the job was cancelled, so it is not requeued;" \
                    "to continue, $AGAIN"
                exit 75
            fi
            log "stopped with a checkpoint: requeueing (restart $(( restarts + 1 )) of at most $MAX_RESTARTS)"
            if scontrol requeue "$JOB_LABEL"; then   # this job, or this array task alone
                exit 0
            fi
            log "scontrol requeue failed: to continue, $AGAIN"
            exit 75 ;;
        74)
            log "training failed: a write to $RUN_DIR failed (its cause and fix are in the error line above):" \
                "not requeueing; the previous checkpoint is intact: once fixed, $AGAIN"
            exit 74 ;;
        *)
            if [[ -n $HELD ]]; then
                log "training did not start: $RUN_DIR is in use by another process: not requeueing; once it" \
                    "has ended, $AGAIN"
            else
                log "training failed (exit $rc): not requeueing"
            fi
            exit "$rc" ;;
    esac
}
