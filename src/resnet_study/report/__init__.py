"""A study read back (`runs`) and written up: Table 1 and statistics, figures, the page
(`writer`, `figures`, `page`)."""
