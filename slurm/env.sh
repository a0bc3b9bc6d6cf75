# Sourced by the job scripts with EGMF_HOME set: enter the project and its Python environment.
cd "$EGMF_HOME"
if [ -n "${EGMF_ENV_SETUP:-}" ]; then
    eval "$EGMF_ENV_SETUP"  # e.g. EGMF_ENV_SETUP='module load cuda/12.4; conda activate egmf'
else
    # shellcheck disable=SC1091
    source "${EGMF_VENV:-$EGMF_HOME/.venv}/bin/activate"
fi
# DeepSpeed JIT-compiles its CPU communication op on first use: keep the build with the environment, so it is
# compiled once, not in every job or requeue (a node-local or missing home would rebuild it each time).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$EGMF_HOME/.cache/torch_extensions}
