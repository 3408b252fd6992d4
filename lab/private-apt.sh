# Sourced by fetch-kernel.sh and fetch-userland.sh: a private apt
# configuration under CACHE/apt-SUITE[-ARCH], so the host's apt sources,
# lists, cache and dpkg state stay untouched (and no foreign architecture is
# ever added to the host's dpkg).
#   private_apt SUITE CACHE [ARCH]  -> exports APT_CONFIG, runs apt-get update
#                                      if its lists are missing or a day old
# Without ARCH (amd64 kernels of other suites) only the sources, lists and
# cache are private, as before. With ARCH (a foreign architecture) the dpkg
# status is an empty private file too: apt resolves dependencies as for an
# empty ARCH system, for `apt-get install --download-only`.
private_apt() {
  local suite=$1 cache=$2 arch=${3:-} a keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  a=$cache/apt-$suite${arch:+-$arch}
  mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/sources.list.d"
  {
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main"
    # bookworm: the suites the host's own sources have (point-release and
    # security updates: the same kernel version as the amd64 lab)
    if [ "$suite" = bookworm ]; then
      echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite-updates main"
      echo "deb [signed-by=$keyring] http://deb.debian.org/debian-security $suite-security main"
    fi
  } > "$a/sources.list.new"
  {
    echo "Dir::Etc::SourceList \"$a/sources.list\";"
    echo "Dir::Etc::SourceParts \"$a/sources.list.d\";"
    echo "Dir::State::Lists \"$a/lists\";"
    echo "Dir::Cache \"$a/cache\";"
    echo "Acquire::Languages \"none\";"
    if [ -n "$arch" ]; then
      mkdir -p "$a/state"; [ -f "$a/status" ] || : > "$a/status"
      echo "Dir::State \"$a/state\";"
      echo "Dir::State::status \"$a/status\";"
      echo "APT::Architecture \"$arch\";"
      echo "APT::Architectures { \"$arch\"; };"
    fi
  } > "$a/apt.conf.new"
  local changed=0
  cmp -s "$a/sources.list.new" "$a/sources.list" || changed=1
  cmp -s "$a/apt.conf.new" "$a/apt.conf" || changed=1
  mv "$a/sources.list.new" "$a/sources.list"; mv "$a/apt.conf.new" "$a/apt.conf"
  export APT_CONFIG=$a/apt.conf
  # a day-old index may name .debs the mirror no longer has
  if [ $changed = 1 ] || [ -z "$(find "$a/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null)" ]; then
    apt-get -q update >&2
  fi
}
