#!/usr/bin/env python3
"""Writes the GeoIP test databases the risk tests read (MaxMind DB format, as GeoLite2 City).

Loopback networks stand for places, so that tests on one machine can sign in "from" them by
binding their source address: python3 -m pip install mmdb-writer && tests/data/make-geoip.py
"""
import os

from mmdb_writer import MMDBWriter
from netaddr import IPSet

HERE = os.path.dirname(os.path.abspath(__file__))

PLACES = [
    ("127.0.0.0/24", "DE", "Frankfurt am Main", 50.1109, 8.6821),
    ("127.0.1.0/24", "DE", "Berlin", 52.52, 13.405),
    ("127.0.2.0/24", "AU", "Sydney", -33.8688, 151.2093),
    ("127.0.3.0/24", "FR", "Paris", 48.8566, 2.3522),
    ("127.0.4.0/24", "US", "New York", 40.7128, -74.006),
    ("127.0.6.0/24", "FR", "Nantes", 47.2184, -1.5536),
    ("127.0.8.0/24", "RU", "Moscow", 55.7558, 37.6173),
    ("2001:db8::/32", "JP", "Tokyo", 35.6762, 139.6503),
]


def city_db():
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-City",
                   languages=["en"], description={"en": "Portcullis test places"})
    for net, country, city, lat, lon in PLACES:
        w.insert_network(IPSet([net]), {
            "country": {"iso_code": country, "names": {"en": country}},
            "city": {"names": {"en": city}},
            "location": {"latitude": lat, "longitude": lon, "accuracy_radius": 20},
        })
    # A coarse record, as databases place an address known by its country only: Poland's
    # centre, to within 1000 km (a circle that holds Frankfurt and reaches towards Moscow).
    w.insert_network(IPSet(["127.0.7.0/24"]), {
        "country": {"iso_code": "PL"},
        "location": {"latitude": 51.0, "longitude": 21.5, "accuracy_radius": 1000},
    })
    # A network the database knows only by country.
    w.insert_network(IPSet(["127.0.5.0/24"]), {"country": {"iso_code": "NL"}})
    w.to_db_file(os.path.join(HERE, "geoip-test.mmdb"))


def asn_db():
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
                   languages=["en"], description={"en": "Portcullis test networks"})
    w.insert_network(IPSet(["127.0.0.0/16"]), {"autonomous_system_number": 64496})
    w.to_db_file(os.path.join(HERE, "geoip-asn-test.mmdb"))


if __name__ == "__main__":
    city_db()
    asn_db()
