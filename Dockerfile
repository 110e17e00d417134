# One image for both services (engine and gateway): the gateway imports the plugin's knob model,
# and a single image keeps the two on exactly the same code; the services differ by command.
# Based on the official vLLM 0.32 OpenAI image (CUDA); nothing is downloaded at build time except
# packages from the Python package index.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/sparsevlm
COPY pyproject.toml README.md ./
COPY sparse_plugin ./sparse_plugin
COPY server ./server

# vLLM, torch and transformers come from the base image; add only what the gateway needs, and
# vllm-router (the router service of docker-compose.yml; the pin of pyproject's router extra).
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m pip install --no-cache-dir \
      "fastapi>=0.115" "uvicorn>=0.30" "httpx>=0.27" "pydantic-settings>=2.3" "prometheus-client>=0.20" \
      "vllm-router==0.1.17" \
 && python3 -c "import sparse_plugin.contract, server.main" && vllm-router --help > /dev/null

RUN useradd --create-home --uid 10001 sparsevlm \
 && mkdir -p /home/sparsevlm/.cache/huggingface && chown -R sparsevlm /home/sparsevlm
USER 10001
ENV HF_HOME=/home/sparsevlm/.cache/huggingface

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=5 \
  CMD ["python3", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HEALTH_PORT','8000'), timeout=4).status == 200 else 1)"]

# Default: the gateway (the engine service overrides the entrypoint and command).
ENTRYPOINT []
# `python -m server`: a bad SPARSEVLM_GATEWAY_* value is one clear line and exit code 2.
CMD ["python3", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
