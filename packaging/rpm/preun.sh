# meshtun %preun ($1: 0 on erase, 1 on upgrade): on erase, stop and disable
# the units. On upgrade they keep running; %postun restarts them.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop meshtun.service meshtun-backbone.service || :
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable meshtun.service meshtun-backbone.service >/dev/null 2>&1 || :
    fi
fi
exit 0
