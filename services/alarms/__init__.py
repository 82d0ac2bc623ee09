"""The alarms service (center half of alarms): the fleet's alarm table, history, acknowledgement,
site health and storm handling. Edge half: edge_agent/alarms; events: schemas/alarms.
"""
