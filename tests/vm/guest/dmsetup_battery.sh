# The dmsetup command battery: the same steps against the kernel's device-mapper (real
# dmsetup on loop devices, in the guest: dmsetup_kernel.sh) and against minidisk's
# (`minidisk dmsetup` on a minidisk server, on the host: tests/vm/test_dmsetup_oracle.py).
#
# Usage: bash dmsetup_battery.sh OUTDIR, with in the environment
#   DMSETUP  the command, word-split ("dmsetup --noudevsync" or "minidisk dmsetup ...")
#   DISK0, DISK1  two 8 MiB devices (16384 sectors) tables may map (paths or keys)
#   DMMAJ    device-mapper's major number on that side (for -j)
#   NODES    a command run after each step (the guest has no udev: `dmsetup mknodes`)
#   IO       a command given a mapped device's name: four 4 KiB reads at 0, two 4 KiB
#            writes at 64 KiB, each one request (the kernel: dd with direct I/O)
# Each step leaves OUTDIR/NNN-NAME.out, .err and .rc (stdout, stderr, exit status) and its
# name in OUTDIR/steps. Steps never stop the battery; their order is their state.
OUT=$1
# One locale on both sides: dmsetup draws trees in UTF-8 only under a UTF-8 locale.
export LC_ALL=C
mkdir -p "$OUT"
: > "$OUT/steps"
n=0

# step NAME ARGS...: run `$DMSETUP ARGS...` with no input. (Builtins only around it: every
# fork costs under TCG.)
step() {
  local name=$1 f; shift
  n=$((n + 1))
  printf -v f '%s/%03d-%s' "$OUT" "$n" "$name"
  # shellcheck disable=SC2086 # DMSETUP is a command line
  $DMSETUP "$@" < /dev/null > "$f.out" 2> "$f.err"
  echo $? > "$f.rc"
  echo "$name" >> "$OUT/steps"
  nodes "$1"
}

# stepin NAME INPUT ARGS...: the same with INPUT on stdin (a table file read from stdin).
stepin() {
  local name=$1 input=$2 f; shift 2
  n=$((n + 1))
  printf -v f '%s/%03d-%s' "$OUT" "$n" "$name"
  # shellcheck disable=SC2086
  $DMSETUP "$@" <<< "$input" > "$f.out" 2> "$f.err"
  echo $? > "$f.rc"
  echo "$name" >> "$OUT/steps"
  nodes "$1"
}

# nodes COMMAND: after a command that adds, renames or removes devices, $NODES.
nodes() {
  case $1 in
    create|rename|remove|remove_all|resume) $NODES > /dev/null 2>&1 ;;
  esac
}

# io NAME: four 4 KiB reads from the start of mapped device NAME, then two writes at 64 KiB,
# each one request of its own (direct I/O), for the stats counters ($IO does it).
io() {
  $IO "$1" > /dev/null 2>&1
}

D0=$DISK0 D1=$DISK1

# --- what the driver and library are, before any device exists
step version version
step version_option --version
step targets_empty targets
step target_version target-version linear striped
step target_version_missing target-version nosuch
step help help
step help_columns help -c
step no_command
step unknown_command frobnicate
step ls_none ls
step ls_tree_none ls --tree
step info_none info
step info_c_none info -c
step table_none table
step status_none status
step deps_none deps
step udevcookies udevcookies
step splitname splitname vg-lv
step splitname_layer splitname vg--one-lv--two-layer
step splitname_subsystem splitname some-thing NOTLVM
step splitname_columns splitname -c -o vg_name,lv_name vg-lv

# --- every command on a device that does not exist
step missing_info info nosuch
step missing_info_c info -c nosuch
step missing_table table nosuch
step missing_status status nosuch
step missing_deps deps nosuch
step missing_suspend suspend nosuch
step missing_resume resume nosuch
step missing_remove remove nosuch
step missing_clear clear nosuch
step missing_load load nosuch --table "0 8 zero"
step missing_reload reload nosuch --table "0 8 zero"
step missing_rename rename nosuch other
step missing_setuuid rename nosuch --setuuid U-X
step missing_message message nosuch 0 hello
step missing_wait wait nosuch
step missing_wipe wipe_table nosuch
step missing_uuid info -u NO-SUCH-UUID
step missing_devno info -j "$DMMAJ" -m 200
step missing_ls_tree_dev ls --tree nosuch

# --- creating devices, and minors as the kernel hands them out
step create_lin create lin --table "0 2048 linear $D0 0"
stepin create_two "0 1024 linear $D0 2048
1024 1024 linear $D1 0" create two
step create_zero create z --table "0 4096 zero"
step create_notable create empty --notable
step create_uuid create withuuid -u UUID-1 --table "0 512 error"
step create_ro create ro -r --table "0 512 linear $D1 4096"
step create_top create top --table "0 2048 linear /dev/mapper/lin 0"
step create_striped create str --table "0 1024 striped 2 8 $D0 4096 $D1 1024"
step create_delay create del --table "0 512 delay $D0 8192 0"
step create_flakey create flk --table "0 512 flakey $D1 8192 60 0"
step create_logwrites create lw --table "0 512 log-writes $D0 $D1"
step create_dup create lin --table "0 8 zero"
step create_dup_uuid create other -u UUID-1 --table "0 8 zero"
step create_long_name create "$(printf 'n%.0s' {1..128})" --table "0 8 zero"
step create_slash_name create a/b --table "0 8 zero"
step info_minors info -c -o name,minor
step create_persistent_minor create pm -j "$DMMAJ" -m 100 --table "0 8 zero"
step create_minor_taken create pm2 -j "$DMMAJ" -m 100 --table "0 8 zero"
step info_pm info pm

# --- listing: ls and its options
step ls ls
step ls_devno ls -o devno
step ls_devname ls -o devname
step ls_blkdevname ls -o blkdevname
step ls_target_linear ls --target linear
step ls_target_striped ls --target striped
step ls_target_none ls --target nosuch
step ls_tree ls --tree
step ls_tree_ascii ls --tree -o ascii
step ls_tree_inverted ls --tree -o ascii,inverted
step ls_tree_compact ls --tree -o ascii,compact
step ls_tree_active ls --tree -o ascii,active
step ls_tree_all_four ls --tree -o ascii,inverted,compact,active
step ls_tree_open ls --tree -o ascii,open
step ls_tree_rw ls --tree -o ascii,rw
step ls_tree_uuid ls --tree -o ascii,uuid
step ls_tree_nodevice ls --tree -o ascii,nodevice
step ls_tree_blkdevname ls --tree -o ascii,blkdevname
step ls_tree_notrunc ls --tree -o ascii,notrunc
step ls_bad_option ls -o nosuch

# --- info, long and in columns
step info_all info
step info_lin info lin
step info_two_names info lin z
step info_empty info empty
step info_ro info ro
step info_withuuid info withuuid
step info_v info -v lin
step info_c info -c
step info_c_lin info -c lin
step info_c_noheadings info -c --noheadings
step info_c_separator info -c --separator ,
step info_c_noheadings_separator info -c --noheadings --separator ';'
step info_c_fields info -c -o name,open,attr,tables_loaded,suspended,readonly
step info_c_plus info -c -o +devno
step info_c_numbers info -c -o name,devno,major,minor,segments,events,read_ahead
step info_c_blkdevname info -c -o name,blkdevname
step info_c_uuid_fields info -c -o name,uuid,mangled_name,unmangled_name
step info_c_deps_fields info -c -o name,device_count,devs_used,device_ref_count,names_using_dev
step info_c_devnos_used info -c -o name,devnos_used,devnos_using_dev,blkdevs_used
step info_c_splitname_fields info -c -o name,subsystem,vg_name,lv_name,lv_layer
step info_c_name_all info -c -o name_all
step info_c_info_all info -c -o info_all
step info_c_sort_name info -c -O name -o name,minor
step info_c_sort_minor_desc info -c -O -minor -o name,minor
step info_c_sort_two info -c -O open,-name -o name,open
step info_c_select_name info -c -S name=lin -o name,minor
step info_c_select_open info -c -S 'open>0' -o name,open
step info_c_select_regex info -c -S 'name=~^t' -o name
step info_c_select_none info -c -S 'name=nothing' -o name
step info_c_select_bad info -c -S 'nofield=1'
step info_c_bad_field info -c -o nosuch
step info_c_bad_sort info -c -O nosuch
step info_c_help info -c -o help
step info_c_nameprefixes info -c --nameprefixes -o name,open lin
step info_c_nameprefixes_noheadings info -c --nameprefixes --noheadings -o name,attr

# --- tables, status, deps
step table_all table
step table_lin table lin
step table_two table two
step table_top table top
step table_striped table str
step table_delay table del
step table_flakey table flk
step table_logwrites table lw
step table_empty table empty
step table_two_names table lin z
step table_target table --target linear
step table_target_one table --target linear two
step table_showkeys table --showkeys lin
step table_concise_one table --concise two
step table_concise_all table --concise
step status_all status
step status_lin status lin
step status_striped status str
step status_delay status del
step status_logwrites status lw
step status_empty status empty
step status_v status -v lin
step status_target status --target striped
step table_v table -v lin
step deps_all deps
step deps_top deps top
step deps_two deps two
step deps_devname deps -o devname top
step deps_blkdevname deps -o blkdevname top
step deps_devname_loops deps -o devname two
step deps_empty deps empty

# --- the lifecycle, and what info says at each point
step load_lin load lin --table "0 2048 linear $D1 0"
step info_lin_both info lin
step info_c_lin_both info -c -o name,attr,tables_loaded lin
step table_inactive table --inactive lin
step status_inactive status --inactive lin
step clear_lin clear lin
step info_lin_cleared info lin
step load_empty load empty --table "0 100 zero"
step info_empty_inactive info empty
step info_c_empty_inactive info -c -o name,attr,tables_loaded,segments empty
step table_empty_inactive table empty
step table_empty_inactive_slot table --inactive empty
step ls_tree_inactive ls --tree -o ascii
step resume_empty resume empty
step info_empty_live info empty
step suspend_lin suspend lin
step info_lin_suspended info lin
step info_c_suspended info -c -o name,attr,suspended lin
step ls_tree_suspended ls --tree -o ascii,active
step suspend_again suspend lin
step resume_lin resume lin
step resume_again resume lin
step suspend_noflush suspend --noflush z
step resume_noflush resume z
step info_z_after info z
step reload_z reload z --table "0 8192 zero"
step resume_reload resume z
step info_z_reloaded info z
step table_z_reloaded table z
step suspend_two suspend two str
step info_c_two_suspended info -c -o name,attr two str
step resume_two resume two str

# --- rename and uuids; the event counter
step rename_z rename z zz
step info_zz info zz
step info_c_zz_events info -c -o name,events,minor zz
step rename_back rename zz z
step info_z_renamed_back info z
step rename_to_existing rename z lin
step rename_same rename z z
step rename_lower rename lin lin2
step table_top_after_rename table top
step deps_top_after_rename deps -o devname top
step ls_tree_after_rename ls --tree -o ascii
step rename_lower_back rename lin2 lin
step setuuid rename z --setuuid UUID-Z
step info_setuuid info z
step setuuid_again rename z --setuuid UUID-Z2
step setuuid_taken rename empty --setuuid UUID-1
step info_by_uuid info -u UUID-Z
step table_by_devno table -j "$DMMAJ" -m 2
step rename_long rename z "$(printf 'n%.0s' {1..128})"

# --- messages
step message_linear message lin 0 hello
step message_flakey message flk 0 hello
step message_zero message z 0 hello
step message_outside message lin 99999 hello
step message_bad_sector message lin x hello
step message_logwrites_mark message lw 0 mark one
step message_logwrites_bad message lw 0 nonsense
step message_logwrites_mark_noarg message lw 0 mark
step status_logwrites_marked status lw
step message_core_cancel message z 0 @cancel_deferred_remove
step message_core_unknown message z 0 @nosuch

# --- stats: regions counted in device-mapper (@stats_* messages), libdm's reports of them
step stats_list_none stats list
step stats_create_none stats create
step stats_create_missing stats create nosuch
step stats_create_both stats create --areas 2 --areasize 1k lin
step stats_create_lin stats create lin
step stats_create_areas stats create --areas 4 z
step stats_create_range stats create --start 1024 --length 512 --areasize 128 two
step stats_create_units stats create --start 1k --length 64k --areasize 16k str
step stats_create_precise stats create --precise --programid myprog --userdata mine str
step stats_create_bounds stats create --bounds 10ms,20ms,1s z
step stats_create_bad_bounds stats create --bounds 20,10 z
step stats_list stats list
step stats_list_v stats list -v
step stats_list_programs stats list --allprograms
step stats_print stats print --regionid 0 lin
step stats_print_noregion stats print lin
step stats_print_all stats print --allregions z
step stats_print_missing stats print --regionid 7 lin
io lin
step stats_report_counts stats report -o name,region_id,area_id,area_start,area_len,read_count,read_sector_count,write_count,write_sector_count,in_progress_count lin
step stats_report_noheadings stats report --noheadings -o region_id,read_count,write_count lin
step stats_report_areas stats report -o name,region_id,area_id,area_start,area_len,area_count,read_count z
step stats_report_meta stats report -o region_id,region_start,region_len,program_id,user_data,precise,hist_bins,hist_bounds str
step stats_report_select stats report -o name,region_id -S 'region_id>0' z
step message_stats_list message lin 0 @stats_list
step message_stats_print_counts message lin 0 @stats_print 0
step message_stats_print_range message z 0 @stats_print 0 1 2
step message_stats_create message z 0 @stats_create - /3 2 precise_timestamps histogram:1,5 prog aux
step message_stats_create_bad message z 0 @stats_create 0+0 1
step message_stats_set_aux message z 0 @stats_set_aux 2 hello
step message_stats_list_aux message z 0 @stats_list
step message_stats_delete_missing message z 0 @stats_delete 9
step message_stats_delete message z 0 @stats_delete 2
step message_stats_clear message lin 0 @stats_clear 0
step message_stats_print_clear message lin 0 @stats_print_clear 0
step stats_clear stats clear --regionid 0 lin
step stats_delete_noregion stats delete lin
step stats_delete stats delete --regionid 0 lin
step stats_delete_missing stats delete --regionid 0 lin
step stats_delete_all stats delete --allregions z
step stats_delete_alldevices stats delete --alldevices --allregions --allprograms
step stats_unknown stats frobnicate

# --- measure, mangle, setgeometry, ls --exec, selections
step measure measure lin
step measure_all measure
step mangle mangle lin
step setgeometry setgeometry lin 10 4 32 0
step setgeometry_bad setgeometry lin x 4 32 0
step ls_exec ls --exec echo
step select_and info -c -o name -S 'name=~^t && open=0'
step select_or info -c -o name -S 'name=lin || name=z'
step select_not info -c -o name -S '!(name=~^t)'
step select_parens info -c -o name,open -S '(name=lin || name=two) && open>0'
step select_list info -c -o name -S 'name=[lin,z]'
step select_bad_paren info -c -o name -S '(name=lin'
step select_bad_op info -c -o name -S 'name<>lin'
step select_help info -c -S help

# --- flakey as 6.1 has it: features drop_writes, error_writes, corrupt_bio_byte
step flakey_drop create fd --table "0 512 flakey $D1 8192 60 0 1 drop_writes"
step flakey_error_writes create few --table "0 512 flakey $D1 8192 60 0 1 error_writes"
step flakey_corrupt create fc --table "0 512 flakey $D1 8192 60 0 5 corrupt_bio_byte 32 r 1 0"
step flakey_corrupt_w create fcw --table "0 512 flakey $D1 8192 60 0 5 corrupt_bio_byte 32 w 1 0"
step flakey_two_features create f2 --table "0 512 flakey $D1 8192 60 0 6 drop_writes corrupt_bio_byte 1 r 0 0"
step flakey_zero_features create f0 --table "0 512 flakey $D1 8192 60 0 0"
step table_flakeys table --target flakey
step status_flakeys status --target flakey
step flakey_error_reads create fer --table "0 512 flakey $D1 8192 60 0 1 error_reads"
step flakey_random create frr --table "0 512 flakey $D1 8192 60 0 2 random_read_corrupt 100"
step flakey_conflict create fx1 --table "0 512 flakey $D1 8192 60 0 2 drop_writes error_writes"
step flakey_duplicate create fx2 --table "0 512 flakey $D1 8192 60 0 2 drop_writes drop_writes"
step flakey_count_short create fx3 --table "0 512 flakey $D1 8192 60 0 2 drop_writes"
step flakey_count_long create fx4 --table "0 512 flakey $D1 8192 60 0 1 drop_writes error_writes"
step flakey_count_bad create fx5 --table "0 512 flakey $D1 8192 60 0 x"
step flakey_too_few create fx6 --table "0 512 flakey $D1 8192 60"
step flakey_zero_interval create fx7 --table "0 512 flakey $D1 8192 0 0"
step flakey_corrupt_short create fx8 --table "0 512 flakey $D1 8192 60 0 3 corrupt_bio_byte 1 r"
step flakey_corrupt_dir create fx9 --table "0 512 flakey $D1 8192 60 0 5 corrupt_bio_byte 1 x 0 0"
step flakey_corrupt_value create fx10 --table "0 512 flakey $D1 8192 60 0 5 corrupt_bio_byte 1 r 256 0"
step flakey_drop_corrupt_w create fx11 --table "0 512 flakey $D1 8192 60 0 6 drop_writes corrupt_bio_byte 1 w 0 0"
step info_fx info fx1 fx2

# --- refused tables: what dmsetup prints, and that nothing is left behind
step bad_gap create bad --table "0 8 zero
16 8 zero"
step bad_overlap create bad --table "0 8 zero
4 8 zero"
step bad_start create bad --table "8 8 zero"
step bad_zero_length create bad --table "0 0 zero"
step bad_unknown_target create bad --table "0 8 nosuch"
step bad_linear_args create bad --table "0 8 linear $D0"
step bad_linear_offset create bad --table "0 8 linear $D0 x"
step bad_linear_small create bad --table "0 20000 linear $D0 0"
step bad_linear_beyond create bad --table "0 8 linear $D0 16380"
step bad_device create bad --table "0 8 linear /dev/nosuch 0"
step bad_mapper_device create bad --table "0 8 linear /dev/mapper/nosuch 0"
step bad_striped_chunk create bad --table "0 1024 striped 2 7 $D0 0 $D1 0"
step bad_striped_count create bad --table "0 1024 striped 2 8 $D0 0"
step bad_striped_length create bad --table "0 1023 striped 2 8 $D0 0 $D1 0"
step bad_delay_args create bad --table "0 8 delay $D0 0"
step bad_logwrites_args create bad --table "0 8 log-writes $D0"
step bad_start_word create bad --table "x 8 zero"
step bad_short_line create bad --table "0 8"
step bad_empty_table create bad --table ""
step info_bad info bad
step load_bad load lin --table "0 8 nosuch"
step info_lin_after_bad info lin
step load_ro_writable load ro --table "0 8 zero"
step info_ro_loaded info ro
step clear_ro clear ro
step minors_after_refusals info -c -o name,minor -O minor

# --- --readahead
step readahead_create create ra --readahead 512 --table "0 8 zero"
step info_ra info ra
step readahead_resume_plus resume ra --readahead +1024
step info_ra_plus info ra
step readahead_resume_smaller resume ra --readahead +16
step info_ra_smaller info ra
step readahead_none resume ra --readahead none
step info_ra_none info ra
step readahead_auto resume ra --readahead auto
step info_ra_auto info ra
step readahead_bad resume ra --readahead lots
step info_c_readahead info -c -o name,read_ahead ra

# --- --concise
step concise_create create --concise "c1,,,,0 8 zero;c2,UUID-C2,,ro,0 8 error,8 8 zero"
step concise_table table --concise c1 c2
step concise_info info c2
step concise_bad create --concise "c3,,,,0 8 nosuch"
step concise_syntax create --concise "c4"
step concise_minor create --concise "c5,,150,,0 8 zero"
step info_c5 info -c -o name,minor c5

# --- minors: freed ones are handed out again, lowest first
step create_m1 create m1 --table "0 8 zero"
step create_m2 create m2 --table "0 8 zero"
step create_m3 create m3 --table "0 8 zero"
step remove_m2 remove m2
step create_m4 create m4 --table "0 8 zero"
step remove_m1 remove m1
step create_m5 create m5 --table "0 8 zero"
step info_c_m_minors info -c -o name,minor -O minor

# --- removal
step remove_busy remove lin
step remove_two_one_busy remove z lin
step info_z_removed info z
step remove_force_busy remove -f lin
step table_lin_forced table lin
step status_lin_forced status lin
step wipe_table wipe_table two
step table_two_wiped table two
step info_two_wiped info two
step remove_deferred_unused remove --deferred del
step info_del info del
step remove_deferred_busy remove --deferred lin
step info_lin_deferred info lin
step info_c_deferred info -c -o name,attr lin
step cancel_deferred message lin 0 @cancel_deferred_remove
step info_lin_cancelled info lin
step remove_top remove top
step remove_lin_now remove lin
step remove_none remove
step remove_several remove two z empty withuuid ro str del flk lw fd few fc fcw f2 f0 fx4 bad ra c1 c2 pm c5
step ls_before_remove_all ls
# remove_all only over plain devices: 6.1's remove_all hit a kernel BUG (slub, in
# dm_ima_measure_on_device_remove) over the battery's full set of devices here.
step remove_all remove_all
step ls_after_remove_all ls
step info_after_remove_all info
step targets targets
# Last, as it differs on purpose (6.1 is built without dm-dust; minidisk has it) and a
# device made on one side only would shift every later minor.
step bad_dust create dst --table "0 8 dust $D0 0 512"
