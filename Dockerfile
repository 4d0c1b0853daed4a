# syntax=docker/dockerfile:1
# Multi-stage build: compile in the official Rust image, run in a slim Debian
# image as a non-root user. protoc comes from the protoc-bin-vendored crate.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin billing \
    && rm -rf src
COPY migrations ./migrations
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin billing

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 billing \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin billing \
    && mkdir -p /var/lib/billing && chown billing:billing /var/lib/billing && chmod 0700 /var/lib/billing
COPY --from=builder /src/target/release/billing /usr/local/bin/billing
USER 10001:10001
ENV BILLING_LISTEN=0.0.0.0:50051 \
    BILLING_METRICS_LISTEN=0.0.0.0:9090 \
    BILLING_WEBHOOK_LISTEN=0.0.0.0:8080 \
    BILLING_DATA_DIR=/var/lib/billing \
    BILLING_LOG_FORMAT=json
# gRPC, /metrics, and the Stripe webhook (only with --gateway stripe and a webhook secret).
EXPOSE 50051 9090 8080
ENTRYPOINT ["billing"]
CMD ["serve"]
