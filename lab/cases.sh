#!/bin/bash
# The lab's cases, run inside the VM by /init: each case builds a fresh
# topology in network namespaces, starts flowguard in the role it names, lets a
# WireGuard-like UDP flow get offloaded by the nftables flowtable, recreates
# the receiving "container" with a new MAC (same IP), watches, and prints one
# machine-readable line:
#   LABRESULT scenario=S role=R key=value ...
# which `cargo xtask lab` turns into its table and checks. Everything else on
# the console is evidence for the log.
#
#   ns wan:       eth0 10.0.0.2          -- UDP peers (main flow, a never-offloaded flow, a flow to another endpoint)
#   ns router:    wan 10.0.0.1, br-lan 192.168.1.1/24 (port lan1) or br-lan.1 on a VLAN-aware bridge,
#                 nft flowtable ft, DNAT 10.0.0.1:51820 -> 192.168.1.240 (or routed)
#   ns host:      eth0 (veth peer of lan1) = lower device of bridge-mode macvlans
#   ns container: macvlan 192.168.1.240, UDP echo on 51820 (recreated with a new MAC)
#   ns other:     macvlan 192.168.1.50, UDP echo on 51820 (another endpoint, left alone)
# The roam scenarios have two ports and no macvlan; the endpoint keeps its
# IP and MAC and moves from one access point to the other:
#   ns router:    br-lan with ports lan1 and lan2, flowtable on wan, lan1, lan2 (as fw4 does)
#   ns host:      eth0 (veth peer of lan1) and the stations' veths in bridge ap (an access point)
#   ns host2:     eth0 (veth peer of lan2) in bridge ap (the other access point)
#   ns container: eth0 192.168.1.240 (veth; its peer moves from host's ap to host2's), UDP echo
#   ns other:     eth0 192.168.1.50 (veth, behind host's ap, stays), UDP echo
#
# Scenarios: blog (flowtable on wan + bridge port lan1, DNAT), routed (same,
# no NAT), vlan (VLAN-aware bridge, L3 on br-lan.1, DNAT), silent (blog, but
# the recreated container announces nothing: no gratuitous ARP, no ping, no
# IPv6 chatter, and no other flow goes to its IP, as with Podman's macvlan or
# a VM with arp_notify=0), control (flowtable on wan + br-lan: no stale MAC
# expected), roam (the endpoint moves, same IP and MAC, from behind lan1 to
# behind lan2 and sends a gratuitous ARP, as a Wi-Fi association makes the
# bridge learn a station; lan1 and its host stay up: the flowtable keeps
# sending out of lan1), roam-silent (roam, but the endpoint sends nothing
# after the move, IPv6 off; it only answers ARP).
# Roles: none | router (flowguard --egress lan1 on the router, fix mode) |
# observe (the same in observe mode, attached with --auto: the flowtable's
# bridge ports read from the ruleset) | host (flowguard on the host's macvlan
# parent, --learn; the router untouched) | ctdel (no flowguard: once the router
# knows the new MAC, `conntrack -D --reply-src IP --status OFFLOAD` by hand,
# what the router role's eviction is meant to do; it shows that the checks of
# the eviction evidence can pass).
# Knobs (kernel command line lab.KEY=VAL -> LAB_KEY):
#   LAB_CASES       comma-separated SCENARIO:ROLE list (default blog:none)
#   LAB_WINDOW      seconds to watch after the change (default 8)
#   LAB_INTERVAL_MS the main peer's send interval (default 200)
set -u
CASES=${LAB_CASES:-blog:none}
WINDOW=${LAB_WINDOW:-8}
IV=${LAB_INTERVAL_MS:-200}
OLD_MAC=02:42:c0:a8:01:f0
NEW_MAC=02:42:de:ad:be:ef
OTHER_MAC=02:42:c0:a8:01:32
CIP=192.168.1.240
OIP=192.168.1.50
PORT=51820
PREFIX=192.168.1.0/24
R="ip netns exec router"; W="ip netns exec wan"; H="ip netns exec host"; C="ip netns exec container"

now() { udpwg now; }
log() { echo "LABLOG [$(now)] $*"; }
wait_until() { # TIMEOUT_S CMD... : poll every 0.3s until CMD succeeds
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.3; done
}
rx_count() { grep -c ' rx ' "$1" 2>/dev/null || true; }
ct_list() { $R conntrack -L -p udp -o id 2>/dev/null; }
# the conntrack lines of the flow of the WAN peer's source port $2, from listing $1
ct_line() { grep -- "sport=$2 " "$1" | head -n 1; }
ct_id() { ct_line "$1" "$2" | sed -n 's/.*id=\([0-9]*\).*/\1/p'; }
# whether an entry of that flow is offloaded: right after an eviction the
# container's answer may open the flow's entry from the LAN side (then the port
# stands in its reply tuple; routed, that entry carries the flow and is
# offloaded), or leave such an entry unreplied beside the offloaded one (NAT)
ct_offloaded() { grep -- "sport=$2 " "$1" | grep -q OFFLOAD; }
flow_offloaded() { ct_list > "$L/ct.now"; ct_offloaded "$L/ct.now" "$1"; }
neigh_is_new() { [ "$(neigh_mac)" = $NEW_MAC ]; }
# the router's bridge port behind which br-lan's FDB places MAC $1 (empty if none)
fdb_port() { $R bridge fdb show br br-lan | awk -v m="$1" '$1 == m && $2 == "dev" {print $3; exit}'; }
neigh_mac() { $R ip neigh show $CIP | awk '{for(i=1;i<NF;i++) if($i=="lladdr") print $(i+1)}'; }
# one counter from `flowguard status --json` (the "counters" object); empty if absent
counter() { # JSON_FILE NAME
  awk -v k="\"$2\":" '/"counters": *\{/ {c=1; next} c && /\}/ {c=0} c && $1==k {v=$2; sub(/,$/,"",v); print v}' "$1"
}

# flowguard is ready, or has exited
fg_settled() { grep -q 'flowguard: ready' "$2" || ! kill -0 "$1" 2>/dev/null; }

mk_macvlan() { # NS IP MAC [silent] : like docker's macvlan driver: create on the host, move into the netns
  ip netns add "$1"; ip -n "$1" link set lo up
  # a silent endpoint sends nothing on its own, IPv6 DAD and router solicitations included
  [ "${4:-}" = silent ] && ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n host link add mv-"$1" link eth0 type macvlan mode bridge || return 1
  ip -n host link set mv-"$1" address "$3"
  ip -n host link set mv-"$1" netns "$1"
  ip -n "$1" link set mv-"$1" name eth0
  ip -n "$1" addr add "$2"/24 dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" route add default via 192.168.1.1
}

mk_station() { # NS IP MAC APNS [silent] : an endpoint on a veth whose peer st-NS is a port of APNS's bridge ap
  ip netns add "$1"; ip -n "$1" link set lo up
  [ "${5:-}" = silent ] && ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip link add eth0 netns "$1" address "$3" type veth peer name st-"$1" netns "$4" || return 1
  ip -n "$4" link set st-"$1" master ap
  ip -n "$4" link set st-"$1" up
  ip -n "$1" addr add "$2"/24 dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" route add default via 192.168.1.1
}

mk_ap() { # NS : bridge ap with the namespace's eth0 as its uplink
  ip -n "$1" link add ap type bridge
  ip -n "$1" link set eth0 master ap
  ip -n "$1" link set ap up
}

topology() { # TOPO NAT [silent]
  local topo=$1 nat=$2 ns
  for ns in wan router host; do ip netns add $ns; ip -n $ns link set lo up; done
  ip link add wan netns router type veth peer name eth0 netns wan
  ip link add lan1 netns router type veth peer name eth0 netns host
  ip -n wan addr add 10.0.0.2/24 dev eth0; ip -n wan link set eth0 up
  ip -n router addr add 10.0.0.1/24 dev wan; ip -n router link set wan up
  ip -n router link set lan1 up
  ip -n host link set eth0 up
  case $topo in
    bridge)
      ip -n router link add br-lan type bridge
      ip -n router link set lan1 master br-lan
      ip -n router addr add 192.168.1.1/24 dev br-lan
      ip -n router link set br-lan up
      L3DEV=br-lan ;;
    vlan)   # OpenWrt-DSA-like: VLAN-aware bridge, L3 on br-lan.1, port untagged in VLAN 1
      ip -n router link add br-lan type bridge vlan_filtering 1
      ip -n router link set lan1 master br-lan
      $R bridge vlan add dev lan1 vid 1 pvid untagged
      $R bridge vlan del dev br-lan vid 1 self
      $R bridge vlan add dev br-lan vid 1 self
      ip -n router link add link br-lan name br-lan.1 type vlan id 1
      ip -n router link set br-lan up
      ip -n router link set br-lan.1 up
      ip -n router addr add 192.168.1.1/24 dev br-lan.1
      L3DEV=br-lan.1 ;;
    roam)   # two ports, each to an access point of its own
      ip netns add host2; ip -n host2 link set lo up
      ip link add lan2 netns router type veth peer name eth0 netns host2
      ip -n router link add br-lan type bridge
      ip -n router link set lan1 master br-lan
      ip -n router link set lan2 master br-lan
      ip -n router link set lan2 up
      ip -n host2 link set eth0 up
      ip -n router addr add 192.168.1.1/24 dev br-lan
      ip -n router link set br-lan up
      mk_ap host && mk_ap host2 || return 1
      L3DEV=br-lan ;;
    *) return 1 ;;
  esac
  $R sysctl -qw net.ipv4.ip_forward=1
  $R sysctl -qw net.netfilter.nf_conntrack_acct=1
  # events for every entry (the default 2 gives them only to entries created while a listener exists)
  $R sysctl -qw net.netfilter.nf_conntrack_events=1
  [ "$nat" = route ] && ip -n wan route add 192.168.1.0/24 via 10.0.0.1
  if [ $topo = roam ]; then
    mk_station container $CIP $OLD_MAC host "${3:-}" && mk_station other $OIP $OTHER_MAC host
  else
    mk_macvlan container $CIP $OLD_MAC && mk_macvlan other $OIP $OTHER_MAC
  fi
}

ruleset() { # DEVS NAT : flowtable on DEVS; port 51821 is forwarded but never offloaded
  echo "table inet fw {"
  echo "  flowtable ft { hook ingress priority filter; devices = { $1 }; counter; }"
  echo "  chain forward {"
  echo "    type filter hook forward priority filter; policy accept;"
  echo "    udp dport 51821 counter accept comment \"never offloaded\""
  echo "    meta l4proto { tcp, udp } flow add @ft"
  echo "  }"
  echo "}"
  if [ "$2" = dnat ]; then
    echo "table ip nat {"
    echo "  chain prerouting {"
    echo "    type nat hook prerouting priority dstnat;"
    echo "    iifname \"wan\" udp dport { 51820, 51821 } dnat to $CIP"
    echo "    iifname \"wan\" udp dport 51822 dnat to $OIP:51820"
    echo "  }"
    echo "}"
  fi
}

teardown() {
  local p
  for p in $(jobs -p); do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip -all netns delete 2>/dev/null
}

run_case() { # SCENARIO ROLE
  local scen=$1 role=$2 topo nat ftdev silent="" roam=""
  case $scen in
    blog)    topo=bridge nat=dnat  ftdev=ports ;;
    silent)  topo=bridge nat=dnat  ftdev=ports silent=silent ;;
    routed)  topo=bridge nat=route ftdev=ports ;;
    vlan)    topo=vlan   nat=dnat  ftdev=ports ;;
    control) topo=bridge nat=dnat  ftdev=l3 ;;
    roam)        topo=roam nat=dnat ftdev=ports roam=roam ;;
    roam-silent) topo=roam nat=dnat ftdev=ports roam=roam silent=silent ;;
    *) echo "LABRESULT scenario=$scen role=$role setup=unknown-scenario"; return ;;
  esac
  L=/tmp/lab/$scen-$role; rm -rf "$L"; mkdir -p "$L"
  echo; echo "===== LABCASE scenario=$scen role=$role topo=$topo nat=$nat ftdev=$ftdev kernel=$(uname -r)"
  local T0; T0=$(now)
  if ! topology $topo $nat $silent > "$L/setup.log" 2>&1; then
    cat "$L/setup.log"; echo "LABRESULT scenario=$scen role=$role setup=topology-failed"; teardown; return
  fi
  local devs="wan, lan1"; [ "$ftdev" = l3 ] && devs="wan, $L3DEV"
  [ -n "$roam" ] && devs="wan, lan1, lan2"
  ruleset "$devs" $nat > "$L/ruleset.nft"
  if ! $R nft -f "$L/ruleset.nft" 2> "$L/nft.err"; then
    cat "$L/ruleset.nft" "$L/nft.err"; echo "LABRESULT scenario=$scen role=$role setup=nft-rejected"; teardown; return
  fi

  # flowguard, before any traffic
  local fgns="" fgpid="" fgstate=none pin=/run/fgbpf/$scen-$role
  local -a fgargs=()
  case $role in
    router)  fgns=router; fgargs=(--egress lan1 --prefix $PREFIX --evict offloaded)
             [ -n "$roam" ] && fgargs=(--egress lan1 --egress lan2 --prefix $PREFIX --evict offloaded) ;;
    observe) fgns=router; fgargs=(--auto --prefix $PREFIX --evict offloaded --mode observe) ;;
    host|restart) fgns=host; fgargs=(--ingress eth0 --egress eth0 --learn --prefix $PREFIX) ;;
    none|ctdel) ;;
    *) echo "LABRESULT scenario=$scen role=$role setup=unknown-role"; teardown; return ;;
  esac
  if [ -n "$fgns" ]; then
    log "starting in ns $fgns: flowguard run ${fgargs[*]} --pin-dir $pin"
    ip netns exec $fgns flowguard run "${fgargs[@]}" --pin-dir "$pin" > "$L/flowguard.log" 2>&1 &
    fgpid=$!
    wait_until 60 fg_settled $fgpid "$L/flowguard.log"
    if grep -q 'flowguard: ready' "$L/flowguard.log" && kill -0 $fgpid 2>/dev/null; then
      fgstate=ready
    else
      fgstate=failed
      echo "LABNOTE scenario=$scen role=$role flowguard did not get ready: $(grep -v '^\[' "$L/flowguard.log" | head -n 1)"
    fi
    log "flowguard $fgstate"
  fi

  # traffic: echo servers, then the peers (main flow, never-offloaded flow, other endpoint)
  local dst=10.0.0.1 odst=10.0.0.1 oport=51822
  [ $nat = route ] && { dst=$CIP; odst=$OIP; oport=51820; }
  $C udpwg echo 0.0.0.0 $PORT container-A > "$L/container-A.log" 2>&1 &
  local echo_a=$!
  ip netns exec other udpwg echo 0.0.0.0 $PORT other > "$L/other.log" 2>&1 &
  $W udpwg peer 0.0.0.0 40000 $dst 51820 "$IV" wanpeer > "$L/wan.log" 2>&1 &
  # the silent endpoint gets no flow but the main one
  [ -z "$silent" ] && $W udpwg peer 0.0.0.0 40001 $dst 51821 500 nonoffload > "$L/wan-nonoff.log" 2>&1 &
  $W udpwg peer 0.0.0.0 40002 $odst $oport 500 otherpeer > "$L/wan-other.log" 2>&1 &
  wait_until 30 flow_offloaded 40000 || log "WARN: main flow not offloaded after 30s"
  wait_until 15 flow_offloaded 40002 || log "WARN: flow to the other endpoint not offloaded after 15s"
  ct_list > "$L/ct.before"
  echo "--- conntrack -L before the change:"; cat "$L/ct.before"
  local offload_before=0; ct_offloaded "$L/ct.before" 40000 && offload_before=1
  local rx_a; rx_a=$(rx_count "$L/container-A.log")
  log "container-A received $rx_a packets; main flow offloaded=$offload_before"

  # conntrack events from now on: the eviction evidence (which entries were destroyed)
  $R conntrack -E -p udp -e NEW,DESTROY > "$L/ct.events" 2>&1 &
  local ct_events=$!
  sleep 0.3

  local t_change fdb_before=""
  if [ -n "$roam" ]; then
    # the change: the endpoint, its echo still running, moves to host2's
    # access point; same IP, same MAC; lan1 and host stay up
    fdb_before=$(fdb_port $OLD_MAC)
    ip -n host link set st-container netns host2
    ip -n host2 link set st-container master ap
    ip -n host2 link set st-container up
    t_change=$(now)
    if [ -n "$silent" ]; then
      log "the endpoint moved from behind lan1 to behind lan2 (FDB had it at $fdb_before); it announces nothing"
    else
      log "the endpoint moved from behind lan1 to behind lan2 (FDB had it at $fdb_before); gratuitous ARP"
      $C arping -U -c 2 -w 2 -I eth0 $CIP > /dev/null 2>&1 &
    fi
  else
    # the change: the container is recreated with a new MAC, same IP
    kill $echo_a; wait $echo_a 2>/dev/null
    ip netns del container
    mk_macvlan container $CIP $NEW_MAC $silent >> "$L/setup.log" 2>&1
    t_change=$(now)
    $C udpwg echo 0.0.0.0 $PORT container-B > "$L/container-B.log" 2>&1 &
    if [ -n "$silent" ]; then
      log "container recreated with $NEW_MAC; it announces nothing"
    else
      log "container recreated with $NEW_MAC; gratuitous ARP and a ping to the router"
      $C arping -U -c 2 -w 2 -I eth0 $CIP > /dev/null 2>&1 &
      $C ping -c 2 -W 1 192.168.1.1 > /dev/null 2>&1 &
    fi
  fi
  if [ $role = ctdel ]; then
    wait_until 5 neigh_is_new || log "WARN: the router did not learn the new MAC within 5s"
    log "conntrack -D --reply-src $CIP --status OFFLOAD"
    $R conntrack -D --reply-src $CIP --status OFFLOAD 2>&1 | sed 's/^/ctdel| /'
  fi

  # restart: while the host role rewrites the stale stream, flowguard is killed
  # (SIGKILL: no cleanup) and started again on the same pin directory; the
  # pinned programs keep guarding meanwhile and the new instance adopts them
  local t_kill="" t_back="" restart_wait=0
  if [ $role = restart ] && [ $fgstate = ready ]; then
    sleep 2; restart_wait=2
    t_kill=$(now); kill -KILL $fgpid; wait $fgpid 2>/dev/null
    log "flowguard killed (SIGKILL); starting it again on $pin"
    ip netns exec $fgns flowguard run "${fgargs[@]}" --pin-dir "$pin" > "$L/flowguard2.log" 2>&1 &
    fgpid=$!
    wait_until 60 fg_settled $fgpid "$L/flowguard2.log"
    t_back=$(now)
    if grep -q 'flowguard: ready' "$L/flowguard2.log" && kill -0 $fgpid 2>/dev/null; then
      log "flowguard ready again"
    else
      fgstate=failed
      echo "LABNOTE scenario=$scen role=$role flowguard did not restart: $(grep -v '^\[' "$L/flowguard2.log" | head -n 1)"
    fi
    restart_wait=$(( restart_wait + ${t_back%.*} - ${t_kill%.*} ))
  fi

  # watch; take flowguard's stale count 3 s before the end to see whether it still grows
  sleep $(( WINDOW - 3 - restart_wait > 1 ? WINDOW - 3 - restart_wait : 1 ))
  [ $fgstate = ready ] && ip netns exec $fgns flowguard status --json --pin-dir "$pin" > "$L/status.mid" 2>&1
  sleep 3
  local t_end; t_end=$(now)
  ct_list > "$L/ct.after"
  kill $ct_events; wait $ct_events 2>/dev/null
  echo "--- conntrack -E (NEW, DESTROY) since just before the change:"; cat "$L/ct.events"
  local neigh; neigh=$(neigh_mac)
  echo "--- conntrack -L at the end:"; cat "$L/ct.after"
  echo "--- router neighbour of $CIP: $neigh"
  local fdb_end=""
  if [ -n "$roam" ]; then
    fdb_end=$(fdb_port $OLD_MAC)
    echo "--- br-lan FDB for $OLD_MAC: $fdb_end (before the move: $fdb_before)"
    $R bridge fdb show br br-lan | grep -v permanent
    # the endpoint's echo ran through the move: its packets after it
    awk -v t="$t_change" '$1 >= t' "$L/container-A.log" > "$L/container-B.log"
  fi

  # flowguard: status, then stop it (SIGTERM: detach, unpin, exit 0)
  local stale=- rewritten=- evicted=- stale_late=- fg_rc=- evict_lines=- rss_kb=- hwm_kb=-
  local wrong_port=- redirected=- port_moves=- port_flaps=- wrong_port_late=-
  if [ -n "$fgpid" ]; then
    if [ $fgstate = ready ]; then
      # the daemon's memory after the whole case (what a router pays)
      rss_kb=$(awk '/^VmRSS:/ {print $2}' /proc/$fgpid/status 2>/dev/null); : "${rss_kb:=-}"
      hwm_kb=$(awk '/^VmHWM:/ {print $2}' /proc/$fgpid/status 2>/dev/null); : "${hwm_kb:=-}"
      ip netns exec $fgns flowguard status --json --pin-dir "$pin" > "$L/status.end" 2>&1
      echo "--- flowguard status --json:"; cat "$L/status.end"
      stale=$(counter "$L/status.end" stale); rewritten=$(counter "$L/status.end" rewritten)
      evicted=$(counter "$L/status.end" evicted)
      local stale_mid; stale_mid=$(counter "$L/status.mid" stale)
      [ -n "$stale" ] && [ -n "$stale_mid" ] && stale_late=$(( stale - stale_mid ))
      : "${stale:=-}" "${rewritten:=-}" "${evicted:=-}"
      wrong_port=$(counter "$L/status.end" wrong_port); redirected=$(counter "$L/status.end" redirected)
      port_moves=$(counter "$L/status.end" port_moves); port_flaps=$(counter "$L/status.end" port_flaps)
      local wrong_mid; wrong_mid=$(counter "$L/status.mid" wrong_port)
      [ -n "$wrong_port" ] && [ -n "$wrong_mid" ] && wrong_port_late=$(( wrong_port - wrong_mid ))
      : "${wrong_port:=-}" "${redirected:=-}" "${port_moves:=-}" "${port_flaps:=-}"
    fi
    kill -TERM $fgpid 2>/dev/null; wait $fgpid; fg_rc=$?
    evict_lines=$(grep -v '^\[' "$L/flowguard.log" | grep -c 'evicted')
    [ "$evicted" = - ] && [ $fgstate = ready ] && evicted=$evict_lines
    echo "--- flowguard output (exit code $fg_rc):"; sed 's/^/fg| /' "$L/flowguard.log"
    [ -f "$L/flowguard2.log" ] && { echo "--- the restarted flowguard:"; sed 's/^/fg2| /' "$L/flowguard2.log"; }
  fi
  # packets sent from the kill until 0.5 s after the restarted flowguard was ready that never arrived
  local lost_restart=-
  if [ -n "$t_kill" ] && [ -n "$t_back" ]; then
    lost_restart=$(awk -v a="$t_kill" -v b="$t_back" '
      FILENAME ~ /wan.log$/ && $3 == "tx" && $1 >= a && $1 <= b + 0.5 { split($4, x, "="); sent[x[2]] = 1 }
      FILENAME ~ /container-B.log$/ && $3 == "rx" { s = $NF; gsub(/[^0-9]/, "", s); got[s] = 1 }
      END { n = 0; for (k in sent) if (!(k in got)) n++; print n }' "$L/wan.log" "$L/container-B.log")
  fi

  # the container's side: loss and time to recovery, from the logs' monotonic timestamps
  local sent_after received_after lost recovery_ms
  read -r sent_after received_after lost recovery_ms < <(
    awk -v t0="$t_change" -v t1="$t_end" '
      FILENAME ~ /wan.log$/ && $3 == "tx" && $1 >= t0 && $1 <= t1 - 0.5 { split($4, a, "="); sent[a[2]] = 1; n++ }
      FILENAME ~ /container-B.log$/ && $3 == "rx" {
        if (first == "") first = $1
        s = $NF; gsub(/[^0-9]/, "", s); got[s] = 1 }
      END {
        r = 0; for (k in sent) if (k in got) r++
        rec = (first == "") ? -1 : int((first - t0) * 1000)
        printf "%d %d %d %d\n", n, r, n - r, rec }' "$L/wan.log" "$L/container-B.log")
  local rx_b; rx_b=$(rx_count "$L/container-B.log")

  # eviction evidence from the conntrack events (ids are no use: a recreated
  # entry often gets the same id): the main flow's entry destroyed and offloaded
  # again; the never-offloaded entry of the same IP and the other endpoint's
  # entry never destroyed
  destroyed() { grep DESTROY "$L/ct.events" | grep -c -- "sport=$1 "; }
  local main_replaced=0 reoffloaded=0 nonoff_kept=0 other_kept=0 other_offloaded=0
  [ "$(destroyed 40000)" -gt 0 ] && main_replaced=1
  [ $main_replaced = 1 ] && ct_offloaded "$L/ct.after" 40000 && reoffloaded=1
  [ "$(destroyed 40001)" -eq 0 ] && [ -n "$(ct_line "$L/ct.after" 40001)" ] && nonoff_kept=1
  [ "$(destroyed 40002)" -eq 0 ] && ct_offloaded "$L/ct.after" 40002 && other_kept=1
  ct_offloaded "$L/ct.before" 40002 && other_offloaded=1
  local nonoff_was_offloaded=0; ct_offloaded "$L/ct.before" 40001 && nonoff_was_offloaded=1
  local neigh_new=0; [ "$neigh" = $NEW_MAC ] && neigh_new=1
  local offload_after=0; ct_offloaded "$L/ct.after" 40000 && offload_after=1
  # roam: whether br-lan's FDB placed the endpoint behind lan2 at the end
  local fdb_moved=-; [ -n "$roam" ] && { fdb_moved=0; [ "$fdb_end" = lan2 ] && fdb_moved=1; }

  echo "LABRESULT scenario=$scen role=$role setup=ok fg=$fgstate fg_rc=$fg_rc" \
    "rx_before=$rx_a offload_before=$offload_before neigh_new=$neigh_new" \
    "sent_after=$sent_after received_after=$received_after lost=$lost recovery_ms=$recovery_ms rx_b=$rx_b" \
    "stale=$stale stale_late=$stale_late rewritten=$rewritten evicted=$evicted evict_lines=$evict_lines" \
    "main_replaced=$main_replaced reoffloaded=$reoffloaded nonoff_kept=$nonoff_kept nonoff_offloaded=$nonoff_was_offloaded" \
    "other_kept=$other_kept other_offloaded=$other_offloaded lost_restart=$lost_restart" \
    "offload_after=$offload_after fdb_before=${fdb_before:--} fdb_moved=$fdb_moved wrong_port=$wrong_port wrong_port_late=$wrong_port_late" \
    "redirected=$redirected port_moves=$port_moves port_flaps=$port_flaps" \
    "rss_kb=$rss_kb hwm_kb=$hwm_kb" \
    "secs=$(awk -v a="$T0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')"
  teardown
}

for c in ${CASES//,/ }; do
  run_case "${c%%:*}" "${c#*:}"
done
