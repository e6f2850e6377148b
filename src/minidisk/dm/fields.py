"""libdm's report fields as dmsetup declares them (lvm2 2.03.16 tools/dmsetup.c, _report_fields):
id, object type, heading, minimum width, value type and description, in dmsetup's order. The
values come from dm/report.py (devices) and dm/stats_report.py (statistics regions and
areas); this module is what both report and what `-o help` and `-S help` print.
"""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    id: str
    type: str  # the report object type: TASK, INFO, DEPS, TREE, NAME, STATS, STATS_META
    heading: str
    width: int
    kind: str  # string, number or size: how it aligns, sorts and is selected
    description: str


FIELDS: tuple[Field, ...] = (
    Field('name', 'TASK', 'Name', 16, 'string',
          'Name of mapped device.'),
    Field('mangled_name', 'TASK', 'MangledName', 16, 'string',
          'Mangled name of mapped device.'),
    Field('unmangled_name', 'TASK', 'UnmangledName', 16, 'string',
          'Unmangled name of mapped device.'),
    Field('uuid', 'TASK', 'UUID', 32, 'string',
          'Unique (optional) identifier for mapped device.'),
    Field('mangled_uuid', 'TASK', 'MangledUUID', 32, 'string',
          'Mangled unique (optional) identifier for mapped device.'),
    Field('unmangled_uuid', 'TASK', 'UnmangledUUID', 32, 'string',
          'Unmangled unique (optional) identifier for mapped device.'),
    Field('read_ahead', 'TASK', 'RAhead', 6, 'number',
          'Read ahead value.'),
    Field('blkdevname', 'INFO', 'BlkDevName', 16, 'string',
          'Name of block device.'),
    Field('attr', 'INFO', 'Stat', 4, 'string',
          '(L)ive, (I)nactive, (s)uspended, (r)ead-only, read-(w)rite.'),
    Field('tables_loaded', 'INFO', 'Tables', 6, 'string',
          'Which of the live and inactive table slots are filled.'),
    Field('suspended', 'INFO', 'Suspended', 9, 'string',
          'Whether the device is suspended.'),
    Field('readonly', 'INFO', 'Read-only', 9, 'string',
          'Whether the device is read-only or writeable.'),
    Field('devno', 'INFO', 'DevNo', 5, 'string',
          'Device major and minor numbers'),
    Field('major', 'INFO', 'Maj', 3, 'number',
          'Block device major number.'),
    Field('minor', 'INFO', 'Min', 3, 'number',
          'Block device minor number.'),
    Field('open', 'INFO', 'Open', 4, 'number',
          'Number of references to open device, if requested.'),
    Field('segments', 'INFO', 'Targ', 4, 'number',
          'Number of segments in live table, if present.'),
    Field('events', 'INFO', 'Event', 6, 'number',
          'Number of most recent event.'),
    Field('device_count', 'DEPS', '#Devs', 5, 'number',
          'Number of devices used by this one.'),
    Field('devs_used', 'TREE', 'DevNamesUsed', 16, 'string',
          'List of names of mapped devices used by this one.'),
    Field('devnos_used', 'DEPS', 'DevNosUsed', 16, 'string',
          'List of device numbers of devices used by this one.'),
    Field('blkdevs_used', 'DEPS', 'BlkDevNamesUsed', 16, 'string',
          'List of names of block devices used by this one.'),
    Field('device_ref_count', 'TREE', '#Refs', 5, 'number',
          'Number of mapped devices referencing this one.'),
    Field('names_using_dev', 'TREE', 'RefNames', 8, 'string',
          'List of names of mapped devices using this one.'),
    Field('devnos_using_dev', 'TREE', 'RefDevNos', 9, 'string',
          'List of device numbers of mapped devices using this one.'),
    Field('subsystem', 'NAME', 'Subsys', 6, 'string',
          'Userspace subsystem responsible for this device.'),
    Field('vg_name', 'NAME', 'VG', 4, 'string',
          'LVM Volume Group name.'),
    Field('lv_name', 'NAME', 'LV', 4, 'string',
          'LVM Logical Volume name.'),
    Field('lv_layer', 'NAME', 'LVLayer', 7, 'string',
          'LVM device layer.'),
    Field('read_count', 'STATS', '#Reads', 6, 'number',
          'Count of reads completed.'),
    Field('reads_merged_count', 'STATS', '#RdMrgs', 7, 'number',
          'Count of read requests merged.'),
    Field('read_sector_count', 'STATS', '#RdSectors', 10, 'number',
          'Count of sectors read.'),
    Field('read_time', 'STATS', 'AccRdTime', 11, 'number',
          'Accumulated duration of all read requests (ns).'),
    Field('write_count', 'STATS', '#Writes', 7, 'number',
          'Count of writes completed.'),
    Field('writes_merged_count', 'STATS', '#WrMrgs', 7, 'number',
          'Count of write requests merged.'),
    Field('write_sector_count', 'STATS', '#WrSectors', 10, 'number',
          'Count of sectors written.'),
    Field('write_time', 'STATS', 'AccWrTime', 11, 'number',
          'Accumulated duration of all writes (ns).'),
    Field('in_progress_count', 'STATS', '#InProg', 7, 'number',
          'Count of requests currently in progress.'),
    Field('io_ticks', 'STATS', 'IoTicks', 7, 'number',
          'Nanoseconds spent servicing requests.'),
    Field('queue_ticks', 'STATS', 'QueueTicks', 10, 'number',
          'Total nanoseconds spent in queue.'),
    Field('read_ticks', 'STATS', 'RdTicks', 7, 'number',
          'Nanoseconds spent servicing reads.'),
    Field('write_ticks', 'STATS', 'WrTicks', 7, 'number',
          'Nanoseconds spent servicing writes.'),
    Field('reads_merged_per_sec', 'STATS', 'RMrg/s', 6, 'number',
          'Read requests merged per second.'),
    Field('writes_merged_per_sec', 'STATS', 'WMrg/s', 6, 'number',
          'Write requests merged per second.'),
    Field('reads_per_sec', 'STATS', 'R/s', 3, 'number',
          'Reads per second.'),
    Field('writes_per_sec', 'STATS', 'W/s', 3, 'number',
          'Writes per second.'),
    Field('read_size_per_sec', 'STATS', 'RSz/s', 5, 'number',
          'Size of data read per second.'),
    Field('write_size_per_sec', 'STATS', 'WSz/s', 5, 'number',
          'Size of data written per second.'),
    Field('avg_request_size', 'STATS', 'AvgRqSz', 7, 'number',
          'Average request size.'),
    Field('queue_size', 'STATS', 'QSize', 5, 'number',
          'Average queue size.'),
    Field('await', 'STATS', 'AWait', 5, 'number',
          'Averate wait time.'),
    Field('read_await', 'STATS', 'RdAWait', 7, 'number',
          'Averate read wait time.'),
    Field('write_await', 'STATS', 'WrAWait', 7, 'number',
          'Averate write wait time.'),
    Field('throughput', 'STATS', 'Throughput', 10, 'number',
          'Throughput.'),
    Field('service_time', 'STATS', 'SvcTm', 5, 'number',
          'Service time.'),
    Field('util', 'STATS', 'Util%', 5, 'number',
          'Utilization.'),
    Field('hist_count', 'STATS', 'Histogram Counts', 16, 'string',
          'Latency histogram counts.'),
    Field('hist_count_bounds', 'STATS', 'Histogram Counts', 16, 'string',
          'Latency histogram counts with bin boundaries.'),
    Field('hist_count_ranges', 'STATS', 'Histogram Counts', 16, 'string',
          'Latency histogram counts with bin ranges.'),
    Field('hist_percent', 'STATS', 'Histogram%', 10, 'string',
          'Relative latency histogram.'),
    Field('hist_percent_bounds', 'STATS', 'Histogram%', 10, 'string',
          'Relative latency histogram with bin boundaries.'),
    Field('hist_percent_ranges', 'STATS', 'Histogram%', 10, 'string',
          'Relative latency histogram with bin ranges.'),
    Field('interval_ns', 'STATS', 'IntervalNs', 10, 'number',
          'Sampling interval in nanoseconds.'),
    Field('interval', 'STATS', 'Interval', 8, 'number',
          'Sampling interval.'),
    Field('region_id', 'STATS_META', 'RgID', 4, 'number',
          'Region ID.'),
    Field('region_start', 'STATS_META', 'RgStart', 7, 'size',
          'Region start.'),
    Field('region_len', 'STATS_META', 'RgSize', 6, 'size',
          'Region length.'),
    Field('area_id', 'STATS_META', 'ArID', 4, 'number',
          'Area ID.'),
    Field('area_start', 'STATS_META', 'ArStart', 7, 'size',
          'Area offset from start of device.'),
    Field('area_len', 'STATS_META', 'ArSize', 6, 'size',
          'Area length.'),
    Field('area_offset', 'STATS_META', 'ArOff', 5, 'size',
          'Area offset from start of region.'),
    Field('area_count', 'STATS_META', '#Areas', 6, 'number',
          'Area count.'),
    Field('group_id', 'STATS_META', 'GrpID', 5, 'number',
          'Group ID.'),
    Field('program_id', 'STATS_META', 'ProgID', 6, 'string',
          'Program ID.'),
    Field('user_data', 'STATS_META', 'UserData', 8, 'string',
          'Auxiliary data.'),
    Field('precise', 'STATS_META', 'Precise', 7, 'string',
          'Set if nanosecond precision counters are enabled.'),
    Field('hist_bins', 'STATS_META', '#Bins', 9, 'string',
          'The number of histogram bins configured.'),
    Field('hist_bounds', 'STATS_META', 'Histogram Bounds', 16, 'string',
          'Latency histogram bin boundaries.'),
    Field('hist_ranges', 'STATS_META', 'Histogram Ranges', 16, 'string',
          'Latency histogram bin ranges.'),
    Field('stats_name', 'STATS_META', 'Name', 16, 'string',
          'Stats name of current object.'),
    Field('obj_type', 'STATS_META', 'ObjType', 7, 'string',
          'Type of stats object being reported.'),
)
BY_ID = {f.id: f for f in FIELDS}

# Report object types: the section title and the prefix of its `PREFIXall` group.
TYPES = {
    "TASK": ("Mapped Device Name", "name_"),
    "INFO": ("Mapped Device Information", "info_"),
    "DEPS": ("Mapped Device Relationship Information", "deps_"),
    "TREE": ("Mapped Device Relationship Information", "tree_"),
    "NAME": ("Mapped Device Name Components", "splitname_"),
    "STATS": ("Mapped Device Statistics", "stats_"),
    "STATS_META": ("Mapped Device Statistics Region Information", "region_"),
}
# `PREFIXall`: every field of the type(s) whose section it opens.
GROUPS = {TYPES[t][1] + "all": [f.id for f in FIELDS if TYPES[f.type][0] == TYPES[t][0]]
          for t in TYPES}
SPECIAL = (("selected", "Set if item passes selection criteria.", "number"),
           ("help", "Show help.", "unselectable number"),
           ("?", "Show help.", "unselectable number"))


def _sections() -> list[tuple[str, str, list[Field]]]:
    """(title, group name, fields) in order; libdm starts a section where the title
    changes (DEPS and TREE share one)."""
    out: list[tuple[str, str, list[Field]]] = []
    for f in FIELDS:
        title, prefix = TYPES[f.type]
        if not out or out[-1][0] != title:
            out.append((title, prefix + "all", []))
        out[-1][2].append(f)
    return out


def help_text(typed: bool = False) -> str:
    """libdm's field list (_display_fields): each section with its `PREFIXall` line, or,
    for a selection (`typed`), without them and with each field's type."""
    width = max(len(f.id) for f in FIELDS)
    out = []
    for title, group, fields in [*_sections(), ("Special", "", [])]:
        out.append(f"{title} Fields\n" + "-" * len(f"{title} Fields") + "\n")
        if title == "Special":
            for name, text, kind in SPECIAL:
                out.append(f"  {name:<{width}} - {text}" + (f" [{kind}]" if typed else "")
                           + "\n")
        else:
            if not typed:
                out.append(f"  {group:<{width}} - All fields in this section.\n")
            for f in fields:
                out.append(f"  {f.id:<{width}} - {f.description}"
                           + (f" [{f.kind}]" if typed else "") + "\n")
        out.append(" \n")
    return "".join(out)
