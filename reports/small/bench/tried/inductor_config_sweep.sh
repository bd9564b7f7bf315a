# run from the repository root on a CUDA machine with OUT set to a results folder
run() { timeout ${3:-150} python3 reports/small/bench/tried/inductor_config_sweep.py "$1" "$2" 2>&1 | grep '^{' ; }
run baseline '{}'
run max_autotune_pointwise '{"max_autotune_pointwise": true}' 200
run aggressive_fusion '{"aggressive_fusion": true}'
MODE=reduce-overhead run reduce_overhead "{}"
run combo_kernels '{"combo_kernels": true}'

