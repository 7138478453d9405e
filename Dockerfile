# syntax=docker/dockerfile:1
# Multi-stage build of the one `ultra` binary; the runtime image runs it as a non-root user.
# Only the `ultra` package is built: the benchmarks (`ultra-bench`) and the test kit are
# workspace members the image never carries.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ultra --bin ultra \
    && install -m 0755 target/release/ultra /usr/local/bin/ultra

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ultra
COPY --from=build /usr/local/bin/ultra /usr/local/bin/ultra
USER 10001:10001
ENV ULTRA_LISTEN=0.0.0.0:8080 \
    ULTRA_WORKER_LISTEN=0.0.0.0:8081 \
    ULTRA_LOG_FORMAT=json
EXPOSE 8080 8081
ENTRYPOINT ["ultra"]
CMD ["all"]
