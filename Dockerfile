# vmvault: the service image used by docker-compose.yml (serve, worker, init).
# Debian 12 with Node 20 and qemu-utils (qemu-img, qemu-nbd); the entry point is
# the vmvault command, so a service's `command` is vmvault's arguments.
FROM node:20-bookworm-slim AS build
WORKDIR /opt/vmvault
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY bin ./bin
COPY src ./src
COPY workers ./workers
COPY test ./test
COPY bench ./bench
COPY scripts ./scripts
RUN npm run build && rm -rf dist/test dist/bench && npm prune --omit=dev --no-audit --no-fund

FROM node:20-bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vmvault
COPY --from=build /opt/vmvault/package.json ./
COPY --from=build /opt/vmvault/node_modules ./node_modules
COPY --from=build /opt/vmvault/dist ./dist
COPY --from=build /opt/vmvault/bin ./bin
COPY policies ./policies.example
COPY vmvault.example.yaml ./
RUN ln -s /opt/vmvault/bin/vmvault.js /usr/local/bin/vmvault
ENV NODE_ENV=production
ENTRYPOINT ["vmvault"]
CMD ["--help"]
