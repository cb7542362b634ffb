# etcd for the local fleet, offline: Debian's etcd binary (from the etcd-server package on the
# host) and its libraries, staged into target/docker-etcd/ by `compose/stage-binaries`.
# With a registry, any etcd 3.5 image does as well.
FROM scratch
COPY target/docker-etcd/ /
COPY --chown=10001:10001 target/docker-etcd/var/lib/ /var/lib/
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/etcd"]
