# meshtun %postun ($1: 0 on erase, 1 on upgrade). /var/lib/meshtun (the
# identity) is not owned by the package and is kept on erase.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart meshtun.service meshtun-backbone.service || :
    fi
fi
exit 0
