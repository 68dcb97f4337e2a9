# meshtun %post ($1: 1 on install, 2 on upgrade). The config files are
# %config(noreplace): an edited /etc/meshtun/*.toml is kept on upgrade (the
# new one is written as *.rpmnew).
# The state directory holds the identity, from which the mesh address is
# derived. Create it 0700 if missing; if it exists only its mode is
# tightened and the files in it are never touched.
if [ -d /var/lib/meshtun ]; then
    chmod 0700 /var/lib/meshtun
else
    install -d -m 0700 -o root -g root /var/lib/meshtun
fi
# The units are not enabled on install: the node needs `backbones` in
# /etc/meshtun/meshtun.toml first.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
exit 0
