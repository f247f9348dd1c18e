"""Which unit of the stages after segment (reconcile, paint, pyramid, table) may start, as the units they
read finish: the run streams instead of waiting.

A home is reconciled once the planned tiles of its 3×3 neighbourhood are segmented; ids are a prefix sum
in raster order, so a home gets its offset once every home before it is counted; a core is painted once
the homes of its neighbourhood have offsets (they hold every cell that may cover it); a chunk row of a
pyramid level is built once the rows of the level it is made from are final up to its source span. The
cell table's rows follow the painted cores in raster (= id) order. So the label image fills behind the
segmenting front, one or two tile rows after it, and the run's end waits only for the last rows.

Plain bookkeeping, no Ray: ``execution`` tells ``Streams`` what finished and submits what it hands out.
Units whose inputs are fixed before the run (tiles without tissue, homes with no cell near them) are
settled at once, exactly as ``extent`` leaves them out of the batch schedule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cellsam_ray.driver import extent
from cellsam_ray.pipeline import labels_out
from cellsam_ray.pipeline.plan import SlidePlan

Home = tuple[int, int]


@dataclass
class _Level:
    """One pyramid level being built row of chunks by row of chunks (rows along y)."""

    level: int
    source: int
    rows: int  # chunk rows
    unit: int  # chunk (or shard) height
    height: int
    spans: list  # per chunk row, the rows of the source level it is made from (computed once)
    next_row: int = 0  # the first chunk row not yet handed out
    final_rows: int = 0  # chunk rows 0..final_rows-1 are written (or need nothing)
    unfinished: dict = field(default_factory=dict)  # chunk row -> chunks handed out and not built
    boxes: dict = field(default_factory=dict)  # chunk row -> the regions of this level built there

    @property
    def frontier(self) -> int:
        """Rows of pixels 0..frontier-1 of this level are final."""
        return min(self.final_rows * self.unit, self.height)


class Streams:
    """The state of the stages after segment of one run; ``take_*`` hand out what may start, once each."""

    def __init__(self, plan: SlidePlan, segmented: set[str]) -> None:
        self.plan, grid = plan, plan.grid
        self.grid = grid
        self.homes = extent.active_homes(plan)  # raster order: the order of the ids
        self.active = set(self.homes)
        self.closure = sorted({rc for home in self.homes for rc in grid.neighbourhood(*home)})
        self._tile_of = {t.key: (t.row, t.col) for t in plan.tiles}
        self._waiting_tiles = {home: 0 for home in self.homes}
        for t in plan.tiles:
            if t.key not in segmented:
                for home in grid.neighbourhood(t.row, t.col):
                    self._waiting_tiles[home] += 1
        self._reconcile = {h for h in self.homes if not self._waiting_tiles[h]}
        self.cells: dict[Home, int] = {}
        self.offsets: dict[Home, int] = {}
        self._next_home, self._total = 0, 0
        self._undecided = {h: sum(rc in self.active for rc in grid.neighbourhood(*h)) for h in self.closure}
        self.painted: set[Home] = set()
        self._writes: set[Home] = set()
        self.writes_open = False
        self._submitted: set[Home] = set()
        self._users = {h: len(grid.neighbourhood(*h)) for h in self.homes}  # closure homes still to settle
        self.released: list[Home] = []  # homes whose kept cells no write needs any more
        self._next_row_home = 0  # the cell table's pointer into ``closure``
        self._table_ready: list[Home] = []  # rows found ready, not yet taken
        self._unsettled_in_row = [0] * grid.rows
        for h in self.closure:
            self._unsettled_in_row[h[0]] += 1
        self._final_tile_rows = 0
        self._moved = True  # a frontier moved since the last search for chunks
        self.written_boxes: dict = {}  # tile row -> cores written there (not left empty), level ``plan.level``
        self._levels: dict[int, _Level] = {}  # in build order; known once writes open (the arrays exist then)
        self._chunks: deque[tuple[int, tuple[int, ...]]] = deque()  # ready, not yet handed out
        self._y = [a for a in plan.axes if a != "c"].index("y")
        self._advance_rows()

    def _level(self, level: int) -> _Level:
        array = labels_out.label_arrays(self.plan)[level]
        unit = (array.shards or array.chunks)[[a for a in self.plan.axes if a != "c"].index("y")]
        height = self.plan.label_shapes[level][0]
        y_map = self.plan.label_maps[level][self._y]
        spans = [y_map.source_span(lo, min(lo + unit, height)) for lo in range(0, height, unit)]
        return _Level(level, labels_out.source_level(self.plan, level), len(spans), unit, height, spans)

    # ----------------------------------------------------------------------------------- reconcile
    def tile_segmented(self, key: str) -> None:
        row, col = self._tile_of[key]
        for home in self.grid.neighbourhood(row, col):
            self._waiting_tiles[home] -= 1
            if not self._waiting_tiles[home]:
                self._reconcile.add(home)

    def take_reconciles(self, n: int, most: int = 1) -> list[Home]:
        """Up to ``n`` homes whose tiles are segmented, in raster order (``most``: see ``_take``)."""
        return self._take(self._reconcile, n, most, lambda home: self._waiting_tiles.get(home, 0) > 0)

    def _take(self, queue: set[Home], n: int, most: int, may_come) -> list[Home]:
        """Up to ``n`` units of ``queue`` in raster order. With ``most`` > 1, the part of a run of neighbours
        along a row beyond its last ``most`` that could still grow (``may_come`` of the next home along the
        row) is held back, so that it goes out later in one larger task rather than now in a small one:
        every task counts for Ray's per-task cost on the driver. Once nothing can come, nothing is held."""
        if n <= 0 or not queue:
            return []
        units, taken, start = sorted(queue), [], 0
        for i, (row, col) in enumerate(units):
            if i + 1 < len(units) and units[i + 1] == (row, col + 1):
                continue
            run, start = units[start : i + 1], i + 1
            tail = len(run) % most
            if tail and may_come((row, col + 1)):
                run = run[:-tail]
            taken += run[: n - len(taken)]
            if len(taken) == n:
                break
        queue.difference_update(taken)
        return taken

    # ------------------------------------------------------------------------------------ ids, paint
    def counted(self, home: Home, cells: int) -> None:
        """A home's reconcile is done: ``cells`` are homed there. Offsets follow in raster order."""
        self.cells[home] = cells
        while self._next_home < len(self.homes) and self.homes[self._next_home] in self.cells:
            done = self.homes[self._next_home]
            self.offsets[done] = self._total
            self._total += self.cells[done]
            self._next_home += 1
            for h in self.grid.neighbourhood(*done):
                self._undecided[h] -= 1
                if not self._undecided[h]:
                    self._decide(h)
        self._advance_rows()

    def _decide(self, home: Home) -> None:
        """Every home near ``home`` is counted: paint its core if one of them holds cells."""
        if any(self.cells.get(rc, 0) for rc in self.grid.neighbourhood(*home)):
            self.painted.add(home)
            self._writes.add(home)
        else:
            self._settle(home)

    def open_writes(self) -> None:
        """Writes may start: the label arrays this run writes exist (after the swap, when one replaces)."""
        self.writes_open = True
        self._levels = {level: self._level(level) for level in labels_out.build_order(self.plan)}
        sources = [lv.source for lv in self._levels.values()]
        self._readers = {source: sources.count(source) for source in sources}

    def take_writes(self, n: int, most: int = 1) -> list[Home]:
        """Up to ``n`` cores to paint, in raster order, once writes are open (``most``: see ``_take``)."""
        if not self.writes_open:
            return []
        taken = self._take(self._writes, n, most, lambda home: self._undecided.get(home, 0) > 0)
        self._submitted.update(taken)
        return taken

    def core_written(self, home: Home, written: bool) -> None:
        if written:
            box = extent.core_box(self.plan, self.grid.tile_at(*home))
            self.written_boxes.setdefault(home[0], []).append(box)
        self._settle(home)
        self._advance_rows()

    def _settle(self, home: Home) -> None:
        self._unsettled_in_row[home[0]] -= 1
        for rc in self.grid.neighbourhood(*home):
            if rc in self._users:
                self._users[rc] -= 1
                if not self._users[rc]:
                    self.released.append(rc)

    # ---------------------------------------------------------------------------------- cell table
    def take_table_rows(self, least: int = 1) -> list[Home]:
        """Painted cores whose table rows may be made, in raster order: the core and every painted core
        near it are submitted (their seam pieces exist as refs) and no core near it is undecided. None
        until at least ``least`` are ready or no core is left to wait for (one table task per batch)."""
        while self._next_row_home < len(self.closure):
            home = self.closure[self._next_row_home]
            if not all(self._ready_for_table(rc) for rc in self.grid.neighbourhood(*home)):
                break
            if home in self.painted:
                self._table_ready.append(home)
            self._next_row_home += 1
        if len(self._table_ready) < least and self._next_row_home < len(self.closure):
            return []
        rows, self._table_ready = self._table_ready, []
        return rows

    @property
    def table_position(self) -> Home | None:
        """The next core the cell table waits for (None once every row is taken): a core before the
        previous row of it, in raster order, is needed by no row still to come."""
        if self._table_ready:
            return self._table_ready[0]
        return self.closure[self._next_row_home] if self._next_row_home < len(self.closure) else None

    def _ready_for_table(self, home: Home) -> bool:
        if home not in self._undecided:
            return True  # far from any cell: never painted
        if self._undecided[home]:
            return False
        return home not in self.painted or home in self._submitted

    # ------------------------------------------------------------------------------------- pyramid
    def _advance_rows(self) -> None:
        rows = self.grid.rows
        while self._final_tile_rows < rows and not self._unsettled_in_row[self._final_tile_rows]:
            self._final_tile_rows += 1
            self._moved = True

    def _frontier(self, level: int) -> int:
        if level == self.plan.level:
            if self._final_tile_rows == self.grid.rows:
                return self.grid.height
            return self._final_tile_rows * self.grid.tile
        return self._levels[level].frontier

    def _boxes(self, level: int) -> tuple[dict, int]:
        """The regions written at ``level``, by row, and the height of a row there."""
        if level == self.plan.level:
            return self.written_boxes, self.grid.tile
        return self._levels[level].boxes, self._levels[level].unit

    def row_of_chunk(self, chunk: tuple[int, ...]) -> int:
        """The chunk row (along y) of a chunk's grid position."""
        return chunk[self._y]

    def take_chunks(self, n: int) -> list[tuple[int, tuple[int, ...]]]:
        """Up to ``n`` chunks of the other levels whose sources are final."""
        if not self.writes_open:
            return []
        if self._moved:
            self._moved = False
            self._find_chunks()
        return [self._chunks.popleft() for _ in range(min(n, len(self._chunks)))]

    def _find_chunks(self) -> None:
        """Queue the chunks of every chunk row whose source rows are final; a row that nothing written
        reaches is final at once, which may make a row of the next level ready in turn."""
        changed = True
        while changed:
            changed = False
            for lv in self._levels.values():
                while lv.next_row < lv.rows:
                    first, end = lv.spans[lv.next_row]
                    if self._frontier(lv.source) < end:
                        break
                    by_row, unit = self._boxes(lv.source)
                    if self._readers[lv.source] == 1:  # rows above this span are read by no later row
                        for row in [r for r in by_row if r < first // unit]:
                            del by_row[row]
                    near = [b for row in range(first // unit, -(-end // unit)) for b in by_row.get(row, ())]
                    chunks = [c for c in extent.chunks_touched(self.plan, lv.level, near) if c[self._y] == lv.next_row]
                    if chunks:
                        lv.unfinished[lv.next_row] = set(chunks)
                        self._chunks.extend((lv.level, c) for c in chunks)
                    lv.next_row += 1
                    changed |= self._advance_level(lv)

    def chunk_built(self, level: int, chunk: tuple[int, ...]) -> None:
        lv = self._levels[level]
        lv.unfinished[chunk[self._y]].discard(chunk)
        lv.boxes.setdefault(chunk[self._y], []).extend(extent.chunk_boxes(self.plan, level, [chunk]))
        self._moved |= self._advance_level(lv)

    def _advance_level(self, lv: _Level) -> bool:
        before = lv.final_rows
        while lv.final_rows < lv.next_row and not lv.unfinished.get(lv.final_rows):
            lv.unfinished.pop(lv.final_rows, None)
            lv.final_rows += 1
        return lv.final_rows != before

    # ------------------------------------------------------------------------------------- the end
    @property
    def complete(self) -> bool:
        """Every home counted, every core settled and every level final."""
        return (self.writes_open and self._next_home == len(self.homes) and self._final_tile_rows == self.grid.rows
                and all(lv.final_rows == lv.rows for lv in self._levels.values()))
