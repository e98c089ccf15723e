# streamvlm on a GPU node: PyPI's default torch wheel for Linux is a CUDA build.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "torch>=2.4"
COPY pyproject.toml README.md ./
COPY pruning ./pruning
COPY pipeline ./pipeline
COPY workers ./workers
COPY streamvlm ./streamvlm
COPY configs ./configs
RUN pip install . && useradd --create-home streamvlm
USER streamvlm
ENTRYPOINT ["streamvlm"]
CMD ["--help"]
