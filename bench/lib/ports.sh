# Shared by the bench scripts (sourced after they cd to the repository root):
# loopback ports and a clock.

# A free TCP port on 127.0.0.1 (bound and released: free unless taken right after).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT, or wait_port HOST PORT: until something accepts there (30 s at most).
wait_port() {
  local host=127.0.0.1 port=$1
  if [ $# -ge 2 ]; then host=$1; port=$2; fi
  for _ in $(seq 1 600); do
    python3 -c "import socket; socket.create_connection(('$host',$port),0.2)" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $host:$port" >&2
  return 1
}

# Seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }
